"""Reaching a Ray cluster, for the tools that scale out on Ray (``rmt-predict --ray`` on Ray Data,
``rmt-serve --ray`` on Ray Serve). Ray is an optional extra: imported here only when asked for."""
from __future__ import annotations

import importlib
import os

INSTALL_HINT = "pip install 'rmt-deploy[ray]'"


class RayMissing(RuntimeError):
    pass


def import_ray(component: str):
    """``ray`` with ``ray.<component>`` ("data", "serve") importable, or RayMissing saying how to install it."""
    try:
        ray = importlib.import_module("ray")
        importlib.import_module(f"ray.{component}")
    except ImportError as exc:
        raise RayMissing(f"--ray needs Ray {component.capitalize()}, which is not installed here ({exc}): "
                         f"{INSTALL_HINT}") from exc
    return ray


def connect(address: str | None, cpus_needed: float, *, component: str, log_to_driver: bool = False) -> bool:
    """Join the cluster at ``address`` ("ray://host:10001", "host:6379" or "auto"), or start a local one
    on 127.0.0.1 without the dashboard, with enough logical CPUs for what will run on it. True when
    this call started a local cluster (the caller shuts it down)."""
    ray = import_ray(component)
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return False
    ray.init(num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)), include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=log_to_driver)
    return True


def device_inside_ray(device: str) -> str:
    """The device as a Ray actor or replica names it: Ray sets CUDA_VISIBLE_DEVICES to the GPU it gave
    that worker, so whatever "cuda:N" the caller chose, the one GPU visible inside is cuda:0."""
    return "cuda:0" if device.startswith("cuda") else device
