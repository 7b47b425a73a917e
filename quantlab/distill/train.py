"""The distillation loop: the student learns the teacher's next-token distribution, with checkpoints.

Losses per predicted position, in nats, averaged over the real (unpadded) tokens:

- ``fkl``: forward KL(P_teacher || P_student), the usual distillation loss (mass-covering);
- ``rkl``: reverse KL(P_student || P_teacher), MiniLLM's choice (arXiv 2306.08543, mode-seeking);
- ``fkl+rkl``: their sum;
- ``ce``: the cross-entropy of the data's next token, without the teacher: sequence-level distillation
  (Kim and Rush, arXiv 1606.07947) when the data is text the teacher wrote, e.g. a speculative draft
  trained on the target's own replies; a fraction of the KL losses' cost (no teacher forward);
- plus ``hidden_weight`` x the mean squared error between the student's and the teacher's residual
  streams after each paired layer, normalized by the teacher's mean square (scale-free).

AdamW with a linear warmup then a cosine decay to 10% of the peak rate; the latent weights, the
quantization scales and the norm weights are separate parameter groups. Everything that decides a
step is a function of (seed, step): the batch rows (quantlab.distill.data.batch_indices) and the rate,
so resuming from a checkpoint reproduces an uninterrupted run exactly (a test holds it to that).

A checkpoint (``state.safetensors`` with the parameters and AdamW's moments, ``state.json`` with the
step, the losses so far and the fingerprint of every input) is written every ``checkpoint_every``
steps into the checkpoint folder, atomically; ``resume`` continues from it and refuses when any input
differs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from quantlab.distill.data import batch_indices
from quantlab.errors import InputError

logger = logging.getLogger(__name__)

LOSSES = ("fkl", "rkl", "fkl+rkl", "ce")
STATE_FILE = "state.safetensors"
INFO_FILE = "state.json"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch: int = 8
    lr: float = 1e-4  # latent weights and other float weights
    scale_lr: float = 1e-4  # quantization scales
    vector_lr: float = 1e-4  # norm weights
    warmup: int = 50
    loss: str = "fkl"
    hidden_weight: float = 0.0
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise InputError(None, "--loss", f"expected one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in ("steps", "batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InputError(None, f"--{name.replace('_', '-')}", "must be >= 1")
        for name in ("lr", "scale_lr", "vector_lr", "hidden_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise InputError(None, f"--{name.replace('_', '-')}", f"must be a finite number >= 0, got {value}")
        if self.warmup < 0:
            raise InputError(None, "--warmup", "must be >= 0")
        if self.loss == "ce" and self.hidden_weight:
            raise InputError(None, "--hidden-weight", "compares with the teacher's states: not with --loss ce")


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 down to 0.1 at the last step."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """student, teacher logits (batch, seq, vocab), mask (batch, seq) bool -> the mean loss (nats)."""
    log_s = torch.log_softmax(student.float(), dim=-1)
    log_t = torch.log_softmax(teacher.float(), dim=-1)
    per_token = torch.zeros(mask.shape, dtype=torch.float32)
    if kind in ("fkl", "fkl+rkl"):
        per_token = per_token + (log_t.exp() * (log_t - log_s)).sum(-1)
    if kind in ("rkl", "fkl+rkl"):
        per_token = per_token + (log_s.exp() * (log_s - log_t)).sum(-1)
    weights = mask.float()
    return (per_token * weights).sum() / weights.sum().clamp_min(1)


def next_token_loss(
    student: torch.Tensor, batch: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy (nats) of ``batch``'s next tokens under the student's logits (batch, seq, vocab)
    over the positions of ``mask``. ``rows``: the token ids the logits are for (a restricted head,
    DecoderLM.restrict_head), sorted; a next token outside them is left out."""
    target = torch.roll(batch, -1, dims=1)  # position t predicts token t + 1 (the last is masked out)
    if rows is not None:
        index = torch.searchsorted(rows, target).clamp_max(len(rows) - 1)
        mask = mask & (rows[index] == target)
        target = index
    per_token = torch.nn.functional.cross_entropy(student.float().transpose(1, 2), target, reduction="none")
    weights = mask.float()
    return (per_token * weights).sum() / weights.sum().clamp_min(1)


def hidden_loss(student_states, teacher_states, pairs, mask: torch.Tensor) -> torch.Tensor:
    """Mean over paired layers of ||h_s - h_t||^2 / ||h_t||^2 on the real tokens."""
    weights = mask.float()[..., None]
    total = torch.zeros(())
    for s_i, t_i in pairs:
        diff = ((student_states[s_i] - teacher_states[t_i]) ** 2 * weights).sum()
        total = total + diff / ((teacher_states[t_i] ** 2 * weights).sum() + 1e-12)
    return total / max(1, len(pairs))


def parameter_groups(model: torch.nn.Module, config: TrainConfig) -> list[dict]:
    groups = {"weights": [], "scales": [], "vectors": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".scale"):
            groups["scales"].append(p)
        elif name.startswith("vectors."):
            groups["vectors"].append(p)
        else:
            groups["weights"].append(p)
    lrs = {"weights": config.lr, "scales": config.scale_lr, "vectors": config.vector_lr}
    return [{"params": ps, "lr": lrs[g], "base_lr": lrs[g], "name": g} for g, ps in groups.items() if ps]


@dataclasses.dataclass
class TrainResult:
    losses: list[float]
    seconds: float
    resumed_from: int


class Checkpoints:
    """The checkpoint folder of one training run (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, fingerprint: dict):
        self.folder = Path(folder)
        self.fingerprint = fingerprint

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, losses: list[float]) -> None:
        from safetensors.torch import save_file

        tensors = {f"param.{n}": p.detach().contiguous() for n, p in model.named_parameters()}
        for i, state in optimizer.state_dict()["state"].items():
            for k, v in state.items():
                tensors[f"adam.{i}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(float(v))).contiguous()
        tmp = self.folder.with_name(self.folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / STATE_FILE))
        info = {"step": step, "losses": losses, "fingerprint": self.fingerprint}
        (tmp / INFO_FILE).write_text(json.dumps(info), encoding="utf-8")
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.rename(tmp, self.folder)

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, list[float]]:
        """(steps done, losses so far); (0, []) when there is no checkpoint."""
        from safetensors.torch import load_file

        info_path = self.folder / INFO_FILE
        if not info_path.is_file():
            return 0, []
        info = json.loads(info_path.read_text(encoding="utf-8"))
        changed = sorted(k for k in self.fingerprint if info["fingerprint"].get(k) != self.fingerprint[k])
        if changed:
            raise InputError(
                self.folder, None, f"cannot resume: {', '.join(changed)} changed since the checkpoint (drop --resume)"
            )
        tensors = load_file(str(self.folder / STATE_FILE))
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(tensors[f"param.{n}"])
        state = {}
        for name, value in tensors.items():
            if name.startswith("adam."):
                _, i, k = name.split(".", 2)
                state.setdefault(int(i), {})[k] = value
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        return int(info["step"]), list(info["losses"])

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def train(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    ids: np.ndarray,
    lengths: np.ndarray,
    config: TrainConfig,
    checkpoints: Checkpoints,
    *,
    resume: bool = False,
    hidden_pairs: list[tuple[int, int]] = (),
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    deadline: float | None = None,
) -> TrainResult:
    """Train ``student`` towards ``teacher`` on ids (n, seq) for ``config.steps`` steps; returns the losses.
    ``teacher`` may be None with the ``ce`` loss, which reads the data alone.

    ``on_step(step, loss)`` runs after each step (and its checkpoint). ``deadline`` (a
    ``time.perf_counter()`` value) ends training early, after the step that passes it: a time budget.
    """
    from tqdm import tqdm

    if teacher is None and config.loss != "ce":
        raise ValueError(f"loss {config.loss} needs a teacher")
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.AdamW(parameter_groups(student, config), weight_decay=0.0)
    start, losses = 0, []
    if resume:
        start, losses = checkpoints.restore(student, optimizer)
        if start:
            logger.info("resuming at step %d from %s", start, checkpoints.folder)
    else:
        checkpoints.discard()
    ids_t = torch.from_numpy(np.array(ids, dtype=np.int64))  # a writable copy
    positions = torch.arange(ids_t.shape[1])
    began = time.perf_counter()
    bar = tqdm(
        total=config.steps,
        initial=start,
        desc="distill",
        unit="step",
        disable=not progress or not sys.stderr.isatty(),
    )
    for step in range(start, config.steps):
        rows = torch.from_numpy(batch_indices(ids_t.shape[0], config.batch, config.seed, step))
        batch = ids_t[rows]  # (batch, seq)
        # position t predicts token t + 1: the last real position predicts nothing
        mask = positions[None, :] < torch.from_numpy(np.asarray(lengths)[rows.numpy()] - 1)[:, None]
        factor = learning_rate_factor(step, config)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        s_logits, s_states = student(batch, hidden_states=True)
        if config.loss == "ce":
            loss = next_token_loss(s_logits, batch, mask, getattr(student, "head_rows", None))
        else:
            with torch.no_grad():
                t_logits, t_states = teacher(batch, hidden_states=True)
            loss = distill_loss(s_logits, t_logits, mask, config.loss)
        if config.hidden_weight and hidden_pairs:
            loss = loss + config.hidden_weight * hidden_loss(s_states, t_states, hidden_pairs, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.update()
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        done = step + 1
        if done % config.checkpoint_every == 0 and done < config.steps:
            checkpoints.save(student, optimizer, done, losses)
        if on_step is not None:
            on_step(done, losses[-1])
        if deadline is not None and time.perf_counter() > deadline and done < config.steps:
            logger.warning("time budget reached after %d of %d steps", done, config.steps)
            break
    bar.close()
    return TrainResult(losses=losses, seconds=time.perf_counter() - began, resumed_from=start)
