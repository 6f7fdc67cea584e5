import pytest
import torch
import torchvision
from torch import nn

from trp_edge.config import DecomposeConfig
from trp_edge.errors import InputError
from trp_edge.models import build, builtin_spec, compressed_payload, infer_spec, load_model
from trp_edge.planning import decompose_


@pytest.mark.parametrize("name,ctor", [("resnet18", torchvision.models.resnet18),
                                       ("resnet34", torchvision.models.resnet34),
                                       ("resnet50", torchvision.models.resnet50)])
def test_torchvision_state_dicts_are_recognised(name, ctor, tmp_path):
    sd = ctor(num_classes=7).state_dict()
    torch.save(sd, tmp_path / "m.pt")
    loaded = load_model(str(tmp_path / "m.pt"))
    assert loaded.spec["name"] == name and loaded.spec["num_classes"] == 7
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, sd[k])


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet56"])
def test_cifar_resnets_round_trip_through_a_state_dict(name, tmp_path):
    spec = builtin_spec(name, in_channels=1, num_classes=10)
    model = build(spec)
    assert infer_spec(model.state_dict()) == spec
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert convs == int(name[6:]) - 1  # 6n + 1 convs and one fc
    out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)


def test_checkpoint_dicts_and_dataparallel_prefixes_are_unwrapped(tmp_path):
    model = build(builtin_spec("resnet20"))
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "ckpt.pt")
    loaded = load_model(str(tmp_path / "ckpt.pt"))
    assert loaded.spec["name"] == "resnet20"
    assert torch.equal(loaded.model.conv1.weight, model.conv1.weight)


def test_explicit_arch_overrides_inference(tmp_path):
    torch.save(build(builtin_spec("resnet20")).state_dict(), tmp_path / "m.pt")
    with pytest.raises(InputError, match="do not fit"):
        load_model(str(tmp_path / "m.pt"), arch="resnet32")


def test_a_state_dict_of_no_known_arch_is_refused(tmp_path):
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)).state_dict(), tmp_path / "odd.pt")
    with pytest.raises(InputError, match="matches no known architecture"):
        load_model(str(tmp_path / "odd.pt"))


def test_pickled_modules_need_trust(tmp_path):
    model = torchvision.models.resnet18(num_classes=3)
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(InputError, match="--trust-pickle"):
        load_model(str(tmp_path / "whole.pt"))
    loaded = load_model(str(tmp_path / "whole.pt"), trust_pickle=True)
    assert loaded.spec["name"] == "resnet18"
    assert torch.equal(loaded.model.fc.weight, model.fc.weight)


def test_torchscript_is_refused_with_the_reason(tmp_path):
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3)))
    scripted.save(str(tmp_path / "ts.pt"))
    with pytest.raises(InputError, match="TorchScript.*cannot be replaced"):
        load_model(str(tmp_path / "ts.pt"))


def test_missing_corrupt_and_unknown_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_model(str(tmp_path / "nope.pt"))
    (tmp_path / "bad.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="not a readable PyTorch file"):
        load_model(str(tmp_path / "bad.pt"))
    with pytest.raises(InputError, match="no such file; built-in models: resnet20.*every torchvision"):
        load_model("vgg17")
    torch.save(build(builtin_spec("resnet20")).state_dict(), tmp_path / "m.pt")
    with pytest.raises(InputError, match="unknown architecture 'vgg17'.*torchvision classification model name"):
        load_model(str(tmp_path / "m.pt"), arch="vgg17")
    with pytest.raises(InputError, match="the weights do not fit the architecture"):  # a name, but not these
        load_model(str(tmp_path / "m.pt"), arch="vgg11")


def test_compressed_payload_rebuilds_without_unpickling_code(tmp_path):
    model = build(builtin_spec("resnet20", num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    plans, _ = decompose_(model, DecomposeConfig(scheme="spatial", energy=0.3), x)
    ranks = {p.name: p.rank for p in plans if p.rank is not None}
    assert ranks
    torch.save(compressed_payload(model, builtin_spec("resnet20"), "spatial", ranks), tmp_path / "compressed.pt")
    torch.load(tmp_path / "compressed.pt", weights_only=True)  # tensors and strings only
    loaded = load_model(str(tmp_path))  # an output directory works too
    assert loaded.lowrank["scheme"] == "spatial"
    model.eval(), loaded.model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))


def test_the_shipped_trained_model_is_the_file_its_record_names():
    """resnet20-fashion-mnist (make demo's starting point) loads by name, and its bytes are those its JSON record
    (the command that made it, its top-1) describes."""
    import hashlib
    import json

    from trp_edge.models.loading import PRETRAINED, load_model

    record = json.loads((PRETRAINED / "resnet20-fashion-mnist.json").read_text())
    assert hashlib.sha256((PRETRAINED / record["file"]).read_bytes()).hexdigest() == record["sha256"]
    loaded = load_model("resnet20-fashion-mnist")
    assert loaded.name == "resnet20-fashion-mnist"
    assert (loaded.spec["name"], loaded.spec["in_channels"], loaded.spec["num_classes"]) == ("resnet20", 1, 10)


@pytest.mark.slow
def test_the_shipped_trained_model_scores_its_recorded_top1():
    import json

    from trp_edge.data import fashion_mnist
    from trp_edge.models.loading import PRETRAINED, load_model
    from trp_edge.trp import evaluate

    record = json.loads((PRETRAINED / "resnet20-fashion-mnist.json").read_text())
    top1 = evaluate(load_model("resnet20-fashion-mnist").model, fashion_mnist().test, torch.device("cpu"))
    assert top1 == pytest.approx(record["top1"], abs=0.02)
