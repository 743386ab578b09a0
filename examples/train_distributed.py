"""Data-parallel LoRA-FA training on torch.distributed: FSDP2 (``--sharding full``) or DDP (``none``).

Each process transforms the model for its share of the batch (``world_size=N``: the printed plan
is one rank's), wraps it with `lorafa_fx.distributed.prepare` (``fully_shard`` per decoder layer
and on the root, or ``DistributedDataParallel``) and trains with AdamW. Only ``lora_B`` is
trained, so only its gradients are averaged across the ranks.

CPU, 2 processes (gloo), a small Llama built from a config (no downloads):

    torchrun --nproc_per_node 2 examples/train_distributed.py --sharding full
    torchrun --nproc_per_node 2 examples/train_distributed.py --sharding none      # DDP

N GPUs on one node (nccl); ``--model`` takes a Hugging Face model id or path:

    torchrun --nproc_per_node 8 examples/train_distributed.py --device cuda --model meta-llama/Llama-2-7b-hf \\
        --batch 8 --seq 1024 --rank 64 --budget 70GB

``accelerate launch --multi_gpu --num_processes N examples/train_distributed.py ...`` starts the
processes through torchrun and works alike (also without GPUs: the script picks gloo for
``--device cpu``; accelerate's ``--cpu`` starts one process only).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import lorafa_fx
from lorafa_fx.distributed import prepare


def _model(args) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=256))


def _batch(step: int, rank: int, args, vocab: int, device) -> dict[str, torch.Tensor]:
    """This rank's rows of the global batch of `step` (a synthetic next-token task)."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, vocab, (args.batch * dist.get_world_size(), 1), generator=g)
    ids = (start + torch.arange(args.seq)) % vocab  # learnable: each token is the previous + 1
    ids = ids[rank * args.batch : (rank + 1) * args.batch].to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sharding", choices=("full", "none"), default="full")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default=None, help="HF model id or path (default: a small Llama from a config)")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--budget", default=None, help="per-rank memory budget, e.g. 70GB")
    p.add_argument("--compile", action="store_true", help="torch.compile the wrapped module")
    p.add_argument("--save", default=None, help="directory for the trained adapter (PEFT's format)")
    args = p.parse_args()

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")

    model = _model(args).to(device)
    vocab = model.config.vocab_size
    gm = lorafa_fx.transform(model, args.budget, example_inputs=_batch(0, rank, args, vocab, device),
                             config=lorafa_fx.LoraFAConfig(r=args.rank, lora_alpha=2 * args.rank),
                             plan=lorafa_fx.PlanConfig(world_size=world, sharding=args.sharding))
    if rank == 0:
        print(gm.lorafa_plan)
    wrapped = prepare(gm)
    step_fn = torch.compile(wrapped) if args.compile else wrapped
    opt = torch.optim.AdamW([q for q in gm.parameters() if q.requires_grad], lr=args.lr)
    for step in range(args.steps):
        opt.zero_grad(set_to_none=True)
        loss = step_fn(**_batch(step, rank, args, vocab, device)).loss
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)  # gloo has no AVG
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {mean.item() / world:.4f}  ({world} ranks, sharding={args.sharding})", flush=True)
    if args.save:
        lorafa_fx.save_adapter(gm, args.save)  # every rank: FSDP2's shards are gathered, rank 0 writes
    dist.barrier()  # every rank is done with its collectives before any tears its group down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
