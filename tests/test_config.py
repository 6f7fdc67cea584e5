"""The configs: one set of device-reach options shared by every workflow that reaches a device, and the
deployment key resolved in one place."""

from __future__ import annotations

import dataclasses

import pytest

from trp_edge.config import BuildConfig, CalibrateConfig, CompressConfig, DeployConfig, DeviceReach
from trp_edge.deployment import Deployment, deployments
from trp_edge.errors import ConfigError
from trp_edge.targets import load_target, resolve_threads


@pytest.mark.parametrize("cls, required", [(BuildConfig, {"model": "m"}), (DeployConfig, {"target": "host"}),
                                           (CalibrateConfig, {"model": "m"})])
def test_every_device_config_reaches_the_device_through_one_set_of_options(cls, required):
    assert issubclass(cls, DeviceReach)
    own = {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(DeviceReach)}
    assert not own & {"host", "port", "tracker", "key"}  # declared once, in DeviceReach
    cfg = cls(**required, tracker="10.0.0.2:9190", key="pi")
    assert cfg.reach == {"host": None, "port": None, "tracker": "10.0.0.2:9190", "key": "pi"}
    assert cls.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="--tracker must be HOST:PORT"):
        cls(**required, tracker="nohostport")


def test_deployments_resolve_threads_once_from_the_target():
    host = load_target("host")
    assert resolve_threads(None, host) == host.run_threads and resolve_threads(3, host) == 3
    deps = deployments(None, "ort,tvm", "fp32,int8", None)
    # TVM is built at fp32 only: no INT8 deployment for it
    assert deps == [Deployment("host", "ort", "fp32", host.run_threads), Deployment("host", "ort", "int8",
                                                                                    host.run_threads),
                    Deployment("host", "tvm", "fp32", host.run_threads)]
    assert str(deps[0]) == f"host/ort fp32, {host.run_threads} thread(s)"


def test_compress_and_deploy_default_to_the_same_precisions():
    assert CompressConfig(model="m").precision is None and DeployConfig(target="host").precision is None
    assert [d.precision for d in deployments(None, None, CompressConfig(model="m").precision, None)] == ["fp32"]


def test_list_options_are_tuples_from_text_or_sequences_and_round_trip():
    c = CompressConfig(model="m", runtime="ort,tflite", precision=["fp32", "int8"])
    assert (c.runtime, c.precision) == (("ort", "tflite"), ("fp32", "int8"))
    assert CompressConfig.from_dict(c.to_dict()) == c
    assert DeployConfig(target="host", precision="int8").precision == ("int8",)
    assert CompressConfig(model="m", runtime="").runtime is None
    with pytest.raises(ConfigError, match="--precision: unknown 'int4'"):
        CompressConfig(model="m", precision="fp32,int4")


def test_a_compress_report_of_0_1_with_comma_separated_precisions_still_reads():
    from trp_edge.contracts import CompressReport

    base = {"model": "m", "arch": {}, "scheme": "spatial", "energy": 0.02, "input_shape": [1, 3, 8, 8],
            "dense": {}, "compressed": {}, "mac_speedup": 1.0, "layers": []}
    assert CompressReport(**base, config={"precision": "fp32,int8"}).planned_precisions == ("fp32", "int8")
    assert CompressReport(**base, config={"precision": ["int8"]}).planned_precisions == ("int8",)
    assert CompressReport(**base).planned_precisions == ("fp32",)
