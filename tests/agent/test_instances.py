"""Engine instances and intra-op threads per model: the auto policy, applied on real ORT loads, and its settings."""

from __future__ import annotations

import pathlib

import click
import pytest

import bundle
from agent import DataPlane, ModelConfig
from agent.commands import serve_command
from agent.config import instances_setting, threads_setting
from agent.daemon import config as daemon_config
from agent.errors import ConfigError
from agent.instances import Placement, available_cores, choose

GIB = 1 << 30
CNN_S = 0.015  # the ~1 GFLOP CNN's warm-up batch on one core of this VM, about
MLP_S = 0.00002


@pytest.mark.parametrize(("kwargs", "want"), [
    # tiny models stay at one instance, the runtime's threads, whatever the cores
    ({"cores": 2, "batch_s": MLP_S}, (1, 0, "tiny")),
    ({"cores": 8, "batch_s": 0.0009}, (1, 0, "tiny")),
    # compute-bound: one instance on every core below 8 cores (measured), two splitting them from 8 on
    ({"cores": 2, "batch_s": CNN_S}, (1, 0, "2 cores: one instance")),
    ({"cores": 4, "batch_s": CNN_S}, (1, 0, "4 cores: one instance")),
    ({"cores": 8, "batch_s": CNN_S}, (2, 4, "compute-bound")),
    ({"cores": 16, "batch_s": CNN_S}, (2, 8, "compute-bound")),
    ({"cores": 1, "batch_s": CNN_S}, (1, 0, "1 core")),
    # not measured (the model rejected every synthesized input): today's default
    ({"cores": 8, "batch_s": None}, (1, 0, "unknown")),
    # GPU engines: one instance, however slow the batch
    ({"cores": 8, "batch_s": CNN_S, "uses_gpu": True}, (1, 0, "GPU")),
    # low memory: a 1 GiB model with 3 GiB available has no room for another copy (2 x 1 GiB > 25% of 3 GiB)
    ({"cores": 8, "batch_s": 0.2, "model_bytes": GIB, "available_bytes": 3 * GIB}, (1, 0, "short")),
    ({"cores": 8, "batch_s": 0.2, "model_bytes": GIB, "available_bytes": 16 * GIB}, (2, 4, "compute-bound")),
    ({"cores": 8, "batch_s": 0.2, "model_bytes": GIB, "available_bytes": 0}, (2, 4, "compute-bound")),  # unknown
    # explicit settings win, alone or together
    ({"cores": 8, "batch_s": CNN_S, "instances": 1, "threads": 0}, (1, 0, "explicit")),
    ({"cores": 2, "batch_s": MLP_S, "instances": 3, "threads": 2}, (3, 2, "explicit")),
    ({"cores": 8, "batch_s": None, "instances": 4}, (4, 2, "explicit instances")),
    ({"cores": 8, "batch_s": None, "instances": 1}, (1, 0, "explicit instances")),
    ({"cores": 8, "batch_s": CNN_S, "instances": 2, "uses_gpu": True}, (2, 0, "explicit instances")),
    ({"cores": 8, "batch_s": CNN_S, "threads": 4}, (2, 4, "explicit threads")),
    ({"cores": 8, "batch_s": CNN_S, "threads": 8}, (1, 8, "explicit threads")),
    ({"cores": 8, "batch_s": CNN_S, "threads": 0}, (1, 0, "explicit threads")),  # a thread per core: one fits
    ({"cores": 2, "batch_s": MLP_S, "threads": 1}, (1, 1, "tiny")),
])
def test_policy(kwargs: dict[str, object], want: tuple[int, int, str]) -> None:
    args: dict[str, object] = {"uses_gpu": False, "model_bytes": 4 << 20, "available_bytes": 8 * GIB, **kwargs}
    p = choose(**args)  # type: ignore[arg-type]
    assert (p.instances, p.threads) == want[:2], p
    assert want[2] in p.reason, p


def test_description_is_the_load_log_line() -> None:
    assert Placement(2, 1, "auto: compute-bound, 2 cores").describe() == \
        "2 instances x 1 thread (auto: compute-bound, 2 cores)"
    assert Placement(1, 0, "explicit").describe() == "1 instance x default threads (explicit)"


async def test_real_cnn_gets_the_auto_placement_and_the_mlp_stays_at_one(
        bundles: dict[str, pathlib.Path], trust: list[bundle.TrustAnchor]) -> None:
    dp = DataPlane()
    (cnn,) = dp.load_bundle(bundle.verify(bundles["cnn"], trust))
    (mlp,) = dp.load_bundle(bundle.verify(bundles["mlp"], trust))
    cores = available_cores()
    assert cnn.runner.placement.reason.startswith("auto: compute-bound")
    if cores >= 8:
        assert (cnn.runner.instances, cnn.runner.placement.threads) == (2, cores // 2)
    else:
        assert (cnn.runner.instances, cnn.runner.placement.threads) == (1, 0)
    # the decision reached the sessions: every instance was built with the chosen thread count
    built = [e.options.intra_op_threads for e in cnn.runner._engines]  # type: ignore[attr-defined]
    assert built == [cnn.runner.placement.threads] * cnn.runner.instances
    assert (mlp.runner.instances, mlp.runner.placement.threads) == (1, 0)
    assert mlp.runner.placement.reason.startswith("auto: tiny")
    meta = dp.model_metadata("cnn")["outpost"]
    assert (meta["instances"], meta["threads"], meta["placement"]) == (
        cnn.runner.instances, cnn.runner.placement.threads, cnn.runner.placement.reason)
    await dp.close()


async def test_explicit_settings_win_on_a_real_load(bundles: dict[str, pathlib.Path],
                                                    trust: list[bundle.TrustAnchor]) -> None:
    dp = DataPlane()
    (cnn,) = dp.load_bundle(bundle.verify(bundles["cnn"], trust), ModelConfig(instances=1, threads=2))
    assert (cnn.runner.instances, cnn.runner.placement) == (1, Placement(1, 2, "explicit"))
    assert cnn.runner._engines[0].options.intra_op_threads == 2  # type: ignore[attr-defined]
    await dp.close()


@pytest.mark.parametrize(("value", "instances", "threads"), [
    ("auto", None, None), ("AUTO", None, None), (None, None, None),
    ("0", None, 0), (0, None, 0),  # instances 0 is auto; threads 0 stays "one per core" (as before)
    ("1", 1, 1), (2, 2, 2), ("64", 64, 64),
])
def test_settings_parse_auto_and_numbers(value: object, instances: int | None, threads: int | None) -> None:
    assert instances_setting(value) == instances
    assert threads_setting(value) == threads


@pytest.mark.parametrize("value", ["many", "-1", "1.5", 2.5, True, "65"])
def test_bad_instances_are_refused_by_name(value: object) -> None:
    with pytest.raises(ConfigError, match="instances must be"):
        instances_setting(value)


def test_serve_defaults_to_auto_and_keeps_explicit_numbers(bundles: dict[str, pathlib.Path]) -> None:
    ctx = serve_command.make_context("serve", [str(bundles["mlp"])])
    assert (ctx.params["instances"], ctx.params["threads"]) == (None, None)
    ctx = serve_command.make_context("serve", [str(bundles["mlp"]), "--instances", "1", "--threads", "0"])
    assert (ctx.params["instances"], ctx.params["threads"]) == (1, 0)  # what the defaults used to be
    ctx = serve_command.make_context("serve", [str(bundles["mlp"]), "--instances", "0", "--threads", "auto"])
    assert (ctx.params["instances"], ctx.params["threads"]) == (None, None)
    with pytest.raises(click.BadParameter, match="instances must be"):
        serve_command.make_context("serve", [str(bundles["mlp"]), "--instances", "lots"])


def test_daemon_toml_model_section(tmp_path: pathlib.Path) -> None:
    def model_config(extra: str) -> ModelConfig:
        path = tmp_path / "agent.toml"
        path.write_text(f'[agent]\ntrust = ["k.pub"]\n[model]\n{extra}')
        return daemon_config.load(path).model_config()

    auto = model_config("")
    assert (auto.instances, auto.threads) == (None, None)
    pinned = model_config("instances = 2\nthreads = 1\n")
    assert (pinned.instances, pinned.threads) == (2, 1)
    assert model_config('instances = 1\nthreads = "auto"\n').instances == 1
    with pytest.raises(ConfigError, match=r"\[model\]\.threads must be"):
        model_config('threads = "fast"\n')


def test_numbers_for_auto_keys_are_named_by_their_own_parser(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\ntrust = ["k.pub"]\n[model]\ninstances = 2.5\n')
    with pytest.raises(ConfigError, match=r"\[model\]\.instances must be .*2\.5"):  # not "expected str"
        daemon_config.load(path)


async def test_metadata_says_where_batches_run(bundles: dict[str, pathlib.Path],
                                               trust: list[bundle.TrustAnchor]) -> None:
    dp = DataPlane()
    (mlp,) = dp.load_bundle(bundle.verify(bundles["mlp"], trust), ModelConfig(inline_compute_ms=0.5))
    assert dp.model_metadata("mlp")["outpost"]["inline_compute_ms"] == 0.5 == mlp.runner.inline_compute_ms
    await dp.close()
