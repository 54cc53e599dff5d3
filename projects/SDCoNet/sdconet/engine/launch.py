"""Starting the training processes: torchrun on any device, detectron2's ``launch`` on GPUs.

detectron2 0.6's ``launch`` spawns one process per GPU and joins them with NCCL, so it cannot
run several processes on CPU. ``torchrun`` starts the processes itself and describes them in
environment variables; :func:`init_torchrun_process_group` joins the group it set up (gloo on
CPU, nccl on CUDA) and gives detectron2's ``comm`` the per-machine group that ``launch`` would
have made, so ``comm.get_local_rank()`` / ``get_local_size()`` work the same either way.
:func:`wrap_ddp` then wraps the model for those processes, on CPU too.
"""
import os
from typing import Callable

import torch
import torch.distributed as dist
from detectron2.engine import DefaultTrainer, launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Variables torchrun (torch.distributed.run) sets in every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def launched_by_torchrun(environ=None) -> bool:
    """True when torchrun started this process (all of ``TORCHRUN_VARIABLES`` are set)."""
    environ = os.environ if environ is None else environ
    return all(name in environ for name in TORCHRUN_VARIABLES)


def distributed_backend(device: str) -> str:
    """``nccl`` for a CUDA device when CUDA is available, ``gloo`` otherwise (CPU)."""
    return "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"


def create_local_process_group() -> None:
    """Set ``comm._LOCAL_PROCESS_GROUP`` to the ranks of this machine (all ranks must call it).

    Machines are told apart by torchrun's ``GROUP_RANK`` (the node's index), gathered from every
    rank, so nodes with different ``--nproc_per_node`` are grouped right too.
    """
    node = int(os.environ.get("GROUP_RANK", dist.get_rank() // int(os.environ["LOCAL_WORLD_SIZE"])))
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    ranks_per_node = [[rank for rank, n in enumerate(nodes) if n == wanted] for wanted in sorted(set(nodes))]
    comm._LOCAL_PROCESS_GROUP, _ = dist.new_subgroups_by_enumeration(ranks_per_node)


def init_torchrun_process_group(device: str, timeout=DEFAULT_TIMEOUT) -> None:
    """Join the process group torchrun describes (``env://``) with the backend for ``device``,
    then create detectron2's per-machine group. Call it once per process, before anything uses
    ``comm``."""
    backend = distributed_backend(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    create_local_process_group()
    comm.synchronize()


def check_total_batch(cfg, world_size: int) -> None:
    """``SOLVER.IMS_PER_BATCH`` is the batch of all processes together: it must split evenly.

    Checked after detectron2's ``SOLVER.REFERENCE_WORLD_SIZE`` rescaling, as the trainer sees it.
    """
    total = DefaultTrainer.auto_scale_workers(cfg, world_size).SOLVER.IMS_PER_BATCH
    if total < world_size or total % world_size:
        scaled = " (after SOLVER.REFERENCE_WORLD_SIZE scaling)" if cfg.SOLVER.REFERENCE_WORLD_SIZE else ""
        raise ValueError(f"SOLVER.IMS_PER_BATCH={total}{scaled} is the total batch over all {world_size} "
                         f"processes and must be a positive multiple of {world_size}")


def launch_training(main_func: Callable, args, device: str = "cuda"):
    """Run ``main_func(args)`` in every training process; ``args`` as detectron2's
    ``default_argument_parser`` gives them, ``device`` the config's MODEL.DEVICE (it picks the
    torchrun backend).

    Under torchrun: join its process group (``--num-gpus`` / ``--num-machines`` must then stay 1:
    torchrun already started the processes) and leave it when ``main_func`` returns. Otherwise
    detectron2's ``launch`` (one process per GPU, NCCL), which needs CUDA for more than one process.
    """
    if launched_by_torchrun():
        if args.num_gpus != 1 or args.num_machines != 1:
            raise ValueError("torchrun started this process: leave --num-gpus and --num-machines at 1 "
                             "(use torchrun's --nproc_per_node and --nnodes)")
        init_torchrun_process_group(device)
        try:
            return main_func(args)
        finally:
            dist.destroy_process_group()
    if args.num_gpus * args.num_machines > 1 and not torch.cuda.is_available():
        raise RuntimeError("--num-gpus / --num-machines start one NCCL process per GPU and need CUDA; on CPU "
                           "start the processes with torchrun: torchrun --nproc_per_node N tools/train_net.py ...")
    return launch(main_func, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
                  dist_url=args.dist_url, args=(args,))


def wrap_ddp(model: nn.Module) -> nn.Module:
    """DistributedDataParallel when several processes train, on CPU (gloo) or CUDA (nccl).

    detectron2 0.6's ``create_ddp_model`` always passes CUDA device ids, which DDP refuses for a
    CPU model. The training step averages gradients itself (inside ``no_sync``), so DDP here only
    broadcasts rank 0's initial weights and keeps the usual ``model.module`` layout.
    """
    if comm.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    device_ids = [device.index if device.index is not None else comm.get_local_rank()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a :func:`wrap_ddp` wrapper (the model itself when there is none)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
