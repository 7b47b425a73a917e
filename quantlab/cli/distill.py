"""Distill a checkpoint into a student folder that `quantlab convert` reads.

  quantlab distill MODEL -o student/ --mode qat --recipe w4a16-g32 --steps 2000       # data-free QAT
  quantlab distill MODEL -o student/ --mode shrink --layers 3 --data train.txt
  quantlab convert student/ -o out/          # emits the trained int4 codes as they are

qat: a fake-quantized copy of the teacher (codes initialized by --init rtn|gptq|awq) learns the teacher's
token distribution; the folder carries the learned codes, scales and zero points. shrink: --layers of the
teacher's layers (evenly spread) are kept and distilled in fp32. Without --data the teacher writes the
training text itself (--samples sequences of --seq-len tokens). Checkpoints go to .OUTPUT.distill/ beside
the output; --resume continues from there.
"""

from __future__ import annotations

import argparse

from quantlab.errors import InputError

HELP = "teacher checkpoint -> distilled student folder (quantization-aware or smaller)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="the teacher: HF folder, .gguf file, or llama2.c .bin")
    p.add_argument("-o", "--output", required=True, help="student folder to create")
    p.add_argument("--mode", choices=["qat", "shrink"], default="qat")
    p.add_argument("--recipe", default="w4a16-g128-asym", help="qat: the scheme to train for (a built-in or a file)")
    p.add_argument("--init", help="qat: rtn (default), gptq or awq; shrink: teacher (default) or random")
    p.add_argument("--layers", type=int, help="shrink: how many layers the student keeps")
    p.add_argument(
        "--data", metavar="FILE", help="training text (or .jsonl/.npy/.json); default: sampled from the teacher"
    )
    p.add_argument("--samples", type=int, default=256, help="training sequences (sampled or read; default 256)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence (default 128)")
    p.add_argument("--calib-samples", type=int, default=64, help="sequences GPTQ/AWQ initialization calibrates on")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument(
        "--lr",
        type=float,
        default=1e-4,
        help="peak learning rate of the weights (default 1e-4); qat with 0: the codes stay fixed, the scales learn",
    )
    p.add_argument("--scale-lr", type=float, help="peak learning rate of the quantization scales (default --lr)")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps (default 50)")
    p.add_argument(
        "--loss",
        choices=["fkl", "rkl", "fkl+rkl", "ce"],
        default="fkl",
        help="forward / reverse KL against the teacher, or ce: cross-entropy of the data's next tokens (text the "
        "teacher wrote, e.g. its replies: no teacher forward)",
    )
    p.add_argument(
        "--head-vocab",
        type=int,
        metavar="N",
        help="shrink, for a speculative draft: train the head on the N tokens most frequent in the data only "
        "(then convert with --head-vocab N --head-vocab-data on the same data)",
    )
    p.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the hidden-state MSE term")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampled data and the batch order")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--accuracy-level", type=int, default=0, choices=range(5), help="MatMulNBits accuracy level")
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="end training early once the whole run (sampling and calibration included) has taken this long",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--tokenizer", help="tokenizer file, when it is not beside the checkpoint (llama2.c)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint of the same inputs")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from quantlab.distill.pipeline import distill
    from quantlab.distill.train import TrainConfig
    from quantlab.emit.staging import terminate_as_exit

    if args.threads is not None:
        if args.threads < 1:
            raise InputError(None, "--threads", "must be >= 1")
        torch.set_num_threads(args.threads)
    lr = args.lr
    config = TrainConfig(
        steps=args.steps,
        batch=args.batch,
        lr=lr,
        scale_lr=args.scale_lr if args.scale_lr is not None else lr,
        vector_lr=lr,
        warmup=args.warmup,
        loss=args.loss,
        hidden_weight=args.hidden_weight,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    with terminate_as_exit():
        result = distill(
            args.source,
            args.output,
            mode=args.mode,
            recipe=args.recipe,
            init=args.init,
            layers=args.layers,
            data=args.data,
            samples=args.samples,
            seq_len=args.seq_len,
            calib_samples=args.calib_samples,
            config=config,
            accuracy_level=args.accuracy_level,
            resume=args.resume,
            overwrite=args.force,
            tokenizer=args.tokenizer,
            progress=not args.no_progress,
            time_budget=args.time_budget,
            head_vocab=args.head_vocab,
        )
    print(
        f"wrote {args.output} ({args.mode}, {len(result['losses'])} steps in {result['train_seconds']} s; "
        f"loss {result['loss_first']:.4f} -> {result['loss_last20_mean']:.4f})"
    )
    return 0
