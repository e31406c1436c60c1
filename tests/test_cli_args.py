"""One CLI vocabulary: every tool's --help spells the shared options the same way, and the old
spellings still parse (hidden)."""
from __future__ import annotations

import pytest

from rmt_deploy.cli_args import SHARED_OPTIONS


def _help(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_every_tool_spells_the_shared_options_alike(capsys):
    from rmt_deploy.benchmarks.cli import main as bench
    from rmt_deploy.exporters.cli import main as export
    from rmt_deploy.predict.cli import main as predict
    from rmt_deploy.server.cli import main as serve
    helps = {"rmt-export": (_help(capsys, export, ["--help"]), {"--backends", "--batch-size"}),
             "rmt-serve": (_help(capsys, serve, ["--help"]), {"--backend"}),
             "rmt-bench": (_help(capsys, bench, ["--help"]), {"--backends", "--batch-sizes"}),
             "rmt-bench accuracy": (_help(capsys, bench, ["accuracy", "--help"]), {"--backends", "--batch-size"}),
             "rmt-bench serve": (_help(capsys, bench, ["serve", "--help"]), {"--backend"}),
             "rmt-predict": (_help(capsys, predict, ["--help"]), {"--backend", "--batch-size"})}
    for tool, (text, own) in helps.items():
        missing = [flag for flag in (*SHARED_OPTIONS, *own) if f"{flag} " not in text and f"{flag}\n" not in text]
        assert not missing, f"{tool} --help lacks {missing}"
        for old in ("--img-size", "--fp16", "--format", "--ema"):
            assert old not in text, f"{tool} shows the old spelling {old}"


def test_old_spellings_are_hidden_aliases():
    from rmt_deploy.benchmarks.cli import bench_parser
    from rmt_deploy.exporters.cli import build_parser
    args = build_parser().parse_args(["--img-size", "64", "--fp16", "--format", "onnx", "--ema"])
    assert (args.image_size, args.precision, args.format, args.weights) == ([64], ["fp32", "fp16"], "onnx", "ema")
    assert build_parser().parse_args(["--no-ema"]).weights == "model"
    assert bench_parser().parse_args(["--img-size", "32"]).image_size == 32
    assert bench_parser().parse_args(["--image-size", "32", "--precision", "fp32,bf16"]).precision == ["fp32", "bf16"]
    from rmt_deploy.predict.cli import build_parser as predict_parser
    assert predict_parser().parse_args(["--img-size", "96", "--data", "d", "--output", "o"]).image_size == 96


def test_unknown_precision_is_refused_alike(capsys):
    from rmt_deploy.benchmarks.cli import bench_parser
    from rmt_deploy.exporters.cli import build_parser
    from rmt_deploy.predict.cli import build_parser as predict_parser
    for parser in (build_parser(), bench_parser(), predict_parser()):
        with pytest.raises(SystemExit):
            parser.parse_args(["--precision", "fp8"])
        assert "unknown fp8; choose from fp32, fp16, bf16" in capsys.readouterr().err


def test_ray_flag_means_the_same_in_rmt_predict_and_rmt_serve():
    """--ray alone or --ray local: a local cluster; --ray ADDRESS: join it (both tools)."""
    from rmt_deploy.cli_args import ray_address
    from rmt_deploy.predict.cli import build_parser as predict_parser
    from rmt_deploy.server.settings import parse_cli
    base = ["--data", "d", "--output", "o"]
    for argv, address in ((["--ray"], None), (["--ray", "local"], None), (["--ray", "ray://head:10001"], "ray://head:10001")):
        assert ray_address(predict_parser().parse_args([*base, *argv]).ray) == address, argv
        assert ray_address(parse_cli(argv).ray) == address, argv
    assert predict_parser().parse_args(base).ray is None
