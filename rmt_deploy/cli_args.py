"""The options every rmt-deploy tool shares, defined once (Polygraphy's tools/args idea): each
``add_*`` adds one argument group to an argparse parser, so ``--model``, ``--checkpoint``,
``--weights``, ``--device``, ``--threads``, ``--precision``, ``--image-size``, ``--backend(s)`` and
``--batch-size(s)`` are spelled, checked and explained the same in every tool. Older spellings stay
as hidden aliases (``--img-size``, ``--fp16``, ``--ema``). rmt-serve takes the same spellings through
its settings class (field names in kebab case).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .checkpoint import WEIGHT_CHOICES

MODEL_HELP = "rmt_t, rmt_s, rmt_b, rmt_l, auto (inferred from --checkpoint) or a config JSON file"
SHARED_OPTIONS = ("--model", "--checkpoint", "--weights", "--device", "--threads", "--precision", "--image-size")


def comma_list(kind=str, choices=None, at_least=None):
    """``a,b,c`` -> [kind(a), kind(b), kind(c)], each checked against ``choices`` / ``at_least``."""
    def parse(text: str) -> list:
        values = [kind(t.strip()) for t in text.split(",") if t.strip()]
        known = choices() if callable(choices) else choices
        unknown = [v for v in values if known is not None and v not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(str, unknown))}; choose from {', '.join(known)}")
        if at_least is not None and any(v < at_least for v in values):
            raise argparse.ArgumentTypeError(f"each must be at least {at_least}, got {text}")
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        return values
    return parse


def at_least(low, kind=int):
    """An argparse type: ``kind(text)``, refused below ``low`` (``at_least(1)``: a positive count)."""
    def parse(text: str):
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value
    return parse


def one_of(choices):
    def parse(text: str) -> str:
        known = choices()
        if text not in known:
            raise argparse.ArgumentTypeError(f"unknown {text}; choose from {', '.join(known)}")
        return text
    return parse


def _backend_names():
    from .runners import backend_names
    return backend_names()


def _precision_names():
    from .runners import precision_names
    return precision_names()


def add_model_args(parser, *, several: bool = False, model_help: str = MODEL_HELP, ema_alias: bool = False):
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="rmt_t", help=model_help + (", comma-separated" if several else ""))
    group.add_argument("--checkpoint", help="released checkpoint (any format); without it: random weights")
    group.add_argument("--weights", choices=WEIGHT_CHOICES, default="auto",
                       help="EMA or raw weights of the checkpoint (auto: EMA when present, raw for RMT-T)")
    if ema_alias:       # --ema / --no-ema before --weights
        group.add_argument("--ema", action=_EmaAlias, nargs=0, dest="weights", help=argparse.SUPPRESS)
        group.add_argument("--no-ema", action=_EmaAlias, nargs=0, dest="weights", help=argparse.SUPPRESS)
    return group


class _EmaAlias(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, "model" if option_string == "--no-ema" else "ema")


def add_device_args(parser, *, device_default: str | None = "cpu", device_help: str = "cpu, cuda or cuda:N"):
    group = parser.add_argument_group("device")
    group.add_argument("--device", default=device_default, help=device_help)
    group.add_argument("--threads", type=at_least(1),
                       help="inference threads (torch, ONNX Runtime, OpenVINO; default: theirs)")
    return group


def add_precision_arg(parser, *, sweep: bool = False, default=("fp32",), fp16_alias: bool = False):
    """``--precision`` (a comma list where the tool sweeps); ``fp16_alias``: the old ``--fp16`` (fp32 and fp16)."""
    kind = comma_list(choices=_precision_names) if sweep else one_of(_precision_names)
    parser.add_argument("--precision", type=kind, default=list(default) if sweep else default[0],
                        help=("comma-separated: " if sweep else "") + f"{', '.join(_precision_names())} where the "
                        "backend runs it")
    if fp16_alias:
        parser.add_argument("--fp16", action="store_const", const=["fp32", "fp16"], dest="precision",
                            help=argparse.SUPPRESS)


def add_calib_arg(parser):
    """``--calib DIR``: real images INT8 is calibrated on (preprocessed as the server does)."""
    parser.add_argument("--calib", type=Path, metavar="DIR",
                        help="folder of real JPEG/PNG images for INT8 calibration (a few hundred; int8 is refused "
                             "without it, never calibrated on noise)")


def add_image_size_arg(parser, *, default: int = 224, pair: bool = False):
    """``--image-size S`` (``S`` or ``H W`` where a tool takes non-square inputs); ``--img-size`` hidden."""
    extra = {"nargs": "+", "default": [default], "metavar": "S"} if pair else {"default": default}
    # every RMT downsamples by 32: a smaller input leaves the last stage no pixel
    parser.add_argument("--image-size", type=at_least(32), help="input size S (or H W)" if pair else "input size S x S",
                        **extra)
    parser.add_argument("--img-size", type=at_least(32), dest="image_size", help=argparse.SUPPRESS,
                        **({"nargs": "+"} if pair else {}), default=argparse.SUPPRESS)


def add_backend_arg(parser, *, sweep: bool = False, default=None, extra_choices: tuple[str, ...] = ()):
    """``--backends a,b`` where a tool sweeps, else ``--backend a``; names come from the registry."""
    def names():
        return (*_backend_names(), *extra_choices)
    if sweep:
        parser.add_argument("--backends", type=comma_list(choices=names), default=default,
                            help=f"comma-separated: {', '.join(names())}")
    else:
        parser.add_argument("--backend", type=one_of(names), default=default, help=", ".join(names()))


def add_batch_size_arg(parser, *, sweep: bool = False, default=1):
    if sweep:
        parser.add_argument("--batch-sizes", type=comma_list(int, at_least=1), default=list(default),
                            help="comma-separated batch sizes")
    else:
        parser.add_argument("--batch-size", type=at_least(1), default=default, help="batch size")


__all__ = ["MODEL_HELP", "SHARED_OPTIONS", "add_backend_arg", "add_batch_size_arg", "add_device_args",
           "add_image_size_arg", "add_model_args", "add_precision_arg", "at_least", "comma_list", "one_of"]


LOCAL_CLUSTER = "local"     # --ray alone, or --ray local: a cluster started here
RAY_HELP = ("run on Ray: join ADDRESS (ray://HOST:10001, HOST:6379, auto), or, alone or as '--ray local', "
            "start a local cluster on 127.0.0.1 without the dashboard")


def ray_flag_options() -> dict:
    """argparse keywords of ``--ray [ADDRESS]``, the same in every tool (rmt-serve's settings class
    passes them to its own parser)."""
    return {"nargs": "?", "const": LOCAL_CLUSTER, "metavar": "ADDRESS"}


def add_ray_address(parser, help: str = RAY_HELP):  # noqa: A002 -- argparse's own keyword
    return parser.add_argument("--ray", help=help, **ray_flag_options())


def ray_address(value: str) -> str | None:
    """The cluster address to join for a ``--ray`` value, or None for a local cluster."""
    return None if value in ("", LOCAL_CLUSTER) else value
