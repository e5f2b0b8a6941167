"""A number typed on a tool's command line is checked by argparse: a value that cannot work stops
the tool at once, with an error naming the flag (``--norm-batch-size 0`` does not fall back to
the config's B: 0 means "derive" only for MODEL.EVALNORM.NORM_BATCH_SIZE)."""

import pytest
from helpers import ROOT, import_tool

from evalnorm_det.engine import add_rescue_arguments, argument_parser, parse_args

DEMO = str(ROOT / "configs" / "demo" / "evalnorm_digits_2img.yaml")


def refused(parse, argv, capsys):
    """argparse's error message for ``parse(argv)``, which must exit with status 2."""
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def rescue_parser():
    return add_rescue_arguments(argument_parser(training=False), "x.pth")


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_norm_batch_size_flag_must_be_a_positive_integer(value, capsys):
    expected = f"argument --norm-batch-size: expected an integer >= 1, got '{value}'"
    convert = import_tool("convert_to_evalnorm").build_parser()
    assert expected in refused(
        lambda a: parse_args(convert, a), ["--config", DEMO, "--norm-batch-size", value], capsys
    )
    assert expected in refused(
        lambda a: parse_args(rescue_parser(), a),
        ["--config", DEMO, "--norm-batch-size", value],
        capsys,
    )
    activations = import_tool("plot_activations").parse_args
    argv = ["--config", DEMO, "-o", "x.png", "--norm-batch-size", value]
    assert expected in refused(activations, argv, capsys)


def test_norm_batch_size_flag_becomes_the_config_key():
    args = parse_args(rescue_parser(), ["--config", DEMO, "--norm-batch-size", "3"])
    assert args.opts[-2:] == ["MODEL.EVALNORM.NORM_BATCH_SIZE", "3"]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--num-gpus", "0"], "argument --num-gpus: expected an integer >= 1, got '0'"),
        (["--coefficients", "1.5"], "argument --coefficients: '1.5': expected rule_of_thumb"),
        (["--beta", "-0.1"], "argument --beta: '-0.1': expected rule_of_thumb, simple or a"),
        (["--coefficients", "nan"], "argument --coefficients: 'nan': expected rule_of_thumb"),
    ],
)
def test_convert_tool_numbers(argv, expected, capsys):
    parser = import_tool("convert_to_evalnorm").build_parser()
    assert expected in refused(lambda a: parse_args(parser, a), ["--config", DEMO, *argv], capsys)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--channel", "-1"], "argument --channel: expected an integer >= 0, got '-1'"),
        (["--num-batches", "0"], "argument --num-batches: expected an integer >= 1, got '0'"),
        (["--dpi", "0"], "argument --dpi"),
    ],
)
def test_plot_activations_numbers(argv, expected, capsys):
    argv = ["--config", DEMO, "-o", "x.png", *argv]
    assert expected in refused(import_tool("plot_activations").parse_args, argv, capsys)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--num-gpus", "0"], "argument --num-gpus: expected an integer >= 1, got 0"),
        (["--num-machines", "0"], "argument --num-machines: expected an integer >= 1, got 0"),
        (
            ["--num-machines", "2", "--machine-rank", "2"],
            "argument --machine-rank: expected an integer from 0 to --num-machines - 1 (1), got 2",
        ),
    ],
)
@pytest.mark.parametrize("training", [True, False], ids=["train_net", "estimate_offline"])
def test_launch_flags(argv, expected, training, capsys):
    parser = argument_parser(training=training)
    assert expected in refused(lambda a: parse_args(parser, a), ["--config", DEMO, *argv], capsys)


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--values", "0,1.5", "expected comma-separated numbers in [0, 1], got '0,1.5'"),
        ("--values", "a", "expected comma-separated numbers in [0, 1], got 'a'"),
        ("--factors", "1,-1", "expected comma-separated numbers >= 0, got '1,-1'"),
        ("--norm-batch-size", "0", "expected an integer >= 1, got '0'"),
    ],
)
def test_diagnose_flags_are_checked(flag, value, expected, capsys):
    parser = import_tool("diagnose_coefficients").build_parser()
    argv = ["--config", DEMO, flag, value]
    assert f"argument {flag}: {expected}" in refused(lambda a: parse_args(parser, a), argv, capsys)


def test_diagnose_flags_parse_lists():
    parser = import_tool("diagnose_coefficients").build_parser()
    args = parse_args(parser, ["--config", DEMO, "--values", "0,0.5", "--factors", "", "SEED", "1"])
    assert args.values == [0.0, 0.5] and args.factors == [] and args.opts == ["SEED", "1"]
