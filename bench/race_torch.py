"""The PyTorch side of ``bench/influence_race.py``: the digits MLP as an ``nn.Module`` and
the attribution libraries people use, each run on it as its documentation shows.

Every peer returns float32 scores [T, N] (query t, training example i) in the library's own
sign convention; ``influence_race`` aligns signs to "positive = supports" (see there).

- kronfluence (Grosse et al. 2023, "Studying Large Language Model Generalization with
  Influence Functions"): ``Analyzer.fit_all_factors`` + ``compute_pairwise_scores`` with
  ``strategy="ekfac"`` and ``"identity"``; true-Fisher labels sampled in
  ``compute_train_loss(sample=True)`` as its examples do.
- dattri (Deng et al., NeurIPS 2024 Datasets and Benchmarks): ``IFAttributorCG``,
  ``IFAttributorLiSSA`` (Koh & Liang 2017; Agarwal et al. 2017) and ``TRAKAttributor``.
- traker (Park et al., ICML 2023, "TRAK: Attributing Model Behavior at Scale"): ``TRAKer``
  with its ``BasicProjector`` on the CPU (its default projector needs CUDA).
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SIZES = (64, 128, 10)


def torch_mlp(layers: list[dict[str, np.ndarray]]) -> nn.Sequential:
    """``nn.Sequential(Linear 64→128, ReLU, Linear 128→10)`` holding memjax's MLP weights
    (memjax stores w as [in, out]; ``nn.Linear`` as [out, in]). Inputs are flat [B, 64]."""
    model = nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.ReLU(),
                          nn.Linear(SIZES[1], SIZES[2]))
    with torch.no_grad():
        for linear, layer in zip((model[0], model[2]), layers, strict=True):
            linear.weight.copy_(torch.from_numpy(np.asarray(layer["w"]).T.copy()))
            linear.bias.copy_(torch.from_numpy(np.asarray(layer["b"]).copy()))
    return model.eval()


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, P] per-example cross-entropy gradients (``torch.func``), parameters flattened in
    memjax's order: for each layer w as [in, out] row-major, then b."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        logits = torch.func.functional_call(model, p, (xi[None],))
        return F.cross_entropy(logits, yi[None])

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    parts = []
    for index in (0, 2):
        parts.append(grads[f"{index}.weight"].transpose(1, 2).reshape(len(x), -1))
        parts.append(grads[f"{index}.bias"])
    return torch.cat(parts, dim=1)


# ---- kronfluence ------------------------------------------------------------------------

def kronfluence_scores(model: nn.Module, train: tuple, queries: tuple, strategy: str,
                       damping_factor: float | None) -> np.ndarray:
    """kronfluence's pairwise scores [T, N] (measurement = the query's cross-entropy)."""
    import copy

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    task = Classification()
    wrapped = prepare_model(copy.deepcopy(model), task)
    train_set = torch.utils.data.TensorDataset(*train)
    query_set = torch.utils.data.TensorDataset(*queries)
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("race", wrapped, task, cpu=True, disable_tqdm=True, output_dir=tmp)
        analyzer.fit_all_factors(strategy, dataset=train_set, per_device_batch_size=500,
                                 factor_args=FactorArguments(strategy=strategy),
                                 overwrite_output_dir=True)
        analyzer.compute_pairwise_scores(
            "scores", strategy, query_dataset=query_set, train_dataset=train_set,
            per_device_query_batch_size=len(query_set), per_device_train_batch_size=500,
            score_args=ScoreArguments(damping_factor=damping_factor),
            overwrite_output_dir=True)
        scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    return scores.float().numpy()


# ---- dattri -------------------------------------------------------------------------------

def _dattri_task(model: nn.Module):
    from dattri.task import AttributionTask

    def loss(params, data):
        x, y = data
        if x.dim() == 1:  # one example (dattri vmaps over examples for gradients)
            x, y = x[None], y[None]
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y.long())

    return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())


def dattri_if_scores(model: nn.Module, train: tuple, queries: tuple, solver: str,
                     **settings) -> np.ndarray:
    """dattri's influence function scores [T, N] with ``solver`` ``"cg"`` or ``"lissa"``.

    The full training set is one batch (the CG solver sums one solve per batch of
    ``full_train_dataloader``, so one batch is the Hessian of the mean training loss)."""
    from dattri.algorithm.influence_function import IFAttributorCG, IFAttributorLiSSA

    task = _dattri_task(model)
    cls = IFAttributorCG if solver == "cg" else IFAttributorLiSSA
    attributor = cls(task=task, device="cpu", **settings)
    train_set = torch.utils.data.TensorDataset(*train)
    query_set = torch.utils.data.TensorDataset(*queries)
    full = torch.utils.data.DataLoader(train_set, batch_size=len(train_set))
    attributor.cache(full)
    test_loader = torch.utils.data.DataLoader(query_set, batch_size=len(query_set))
    with torch.no_grad():
        scores = attributor.attribute(full, test_loader)  # [N, T]
    return scores.T.float().numpy()


def dattri_trak_scores(model: nn.Module, train: tuple, queries: tuple,
                       proj_dim: int) -> np.ndarray:
    """dattri's TRAK scores [T, N] (one checkpoint, projected dimension ``proj_dim``)."""
    from dattri.algorithm.trak import TRAKAttributor

    def correct_probability(params, data):
        x, y = data
        logits = torch.func.functional_call(model, params, (x[None],))
        return torch.exp(-F.cross_entropy(logits, y[None].long()))

    attributor = TRAKAttributor(task=_dattri_task(model),
                                correct_probability_func=correct_probability,
                                projector_kwargs={"proj_dim": proj_dim, "device": "cpu"},
                                device="cpu")
    train_set = torch.utils.data.TensorDataset(*train)
    query_set = torch.utils.data.TensorDataset(*queries)
    attributor.cache(torch.utils.data.DataLoader(train_set, batch_size=500))
    with torch.no_grad():
        scores = attributor.attribute(torch.utils.data.DataLoader(query_set, batch_size=500))
    return scores.T.float().numpy()


# ---- traker -------------------------------------------------------------------------------

def traker_scores(model: nn.Module, train: tuple, queries: tuple, proj_dim: int) -> np.ndarray:
    """TRAKer's scores [T, N] on the CPU with ``BasicProjector`` (Gaussian), float32."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    grad_dim = sum(p.numel() for p in model.parameters())
    projector = BasicProjector(grad_dim=grad_dim, proj_dim=proj_dim, seed=0,
                               proj_type=ProjectionType.normal, device=torch.device("cpu"))
    n, t = len(train[0]), len(queries[0])
    batch = 500
    with tempfile.TemporaryDirectory() as tmp:
        traker = TRAKer(model=model, task="image_classification", train_set_size=n,
                        save_dir=tmp, device="cpu", projector=projector, proj_dim=proj_dim,
                        use_half_precision=False)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for lo in range(0, n, batch):
            traker.featurize(batch=(train[0][lo:lo + batch], train[1][lo:lo + batch]),
                             num_samples=min(batch, n - lo))
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="race", checkpoint=model.state_dict(),
                                        model_id=0, num_targets=t)
        for lo in range(0, t, batch):
            traker.score(batch=(queries[0][lo:lo + batch], queries[1][lo:lo + batch]),
                         num_samples=min(batch, t - lo))
        scores = traker.finalize_scores(exp_name="race")  # [N, T]
    return np.asarray(scores, dtype=np.float32).T
