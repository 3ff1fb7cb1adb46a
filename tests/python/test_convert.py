"""lowbit.convert: layers swapped by name pattern, weights and biases copied, the result runs and trains."""
import pytest
import torch

import lowbit
from lowbit.nn import Q4Conv2d, Q4Linear, Q8Linear
import reference as ref


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 4))


def test_convert_q8_copies_weights_and_keeps_excluded(device):
    model = _mlp().to(device)
    q = lowbit.convert(model, "q8", exclude=["4"])
    assert isinstance(q[0], Q8Linear) and isinstance(q[2], Q8Linear) and type(q[4]) is torch.nn.Linear
    assert type(model[0]) is torch.nn.Linear  # not in place by default
    assert torch.equal(q[0].weight, model[0].weight) and torch.equal(q[0].bias, model[0].bias)
    assert q[0].bias is not None and "bias" in q[0].state_dict()
    x = torch.randn(64, 20, device=device)
    y, y_ref = q(x), model(x)
    assert ref.rel_err(y, y_ref.detach()) < 0.1  # 8-bit quantization error of a small MLP


def test_output_bias_matches_the_math(device):
    layer = Q8Linear(12, 5, device=device, bias=True)
    with torch.no_grad():
        layer.bias.copy_(torch.randn(5))
    x = torch.randn(3, 12, device=device, requires_grad=True)
    y = layer(x)
    s_a = max(ref.f32(layer.scale_a.item()), 1e-5)
    s_w = ref.lsq_scale(layer.weight.detach().cpu(), 127.0, 1e-5)
    y_ref, _ = ref.q_linear_forward(x.detach().cpu(), layer.bias_a.detach().cpu(),
                                    ref.codes(layer.weight.detach().cpu(), s_w, -128, 127), s_a, s_w, -128, 127)
    assert ref.rel_err(y, y_ref + layer.bias.detach().cpu().double()) < 1e-5
    g = torch.randn(3, 5, device=device)
    (y * g).sum().backward()
    assert ref.rel_err(layer.bias.grad, g.sum(0).double()) < 1e-6


def test_convert_q4_cnn_trains(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 3 * 3, 2)).to(device)
    q = lowbit.convert(model, "q4", rules=[("5", None)])
    assert isinstance(q[0], Q4Conv2d) and isinstance(q[2], Q4Conv2d) and type(q[5]) is torch.nn.Linear
    assert q[2].stride == (2, 2) and q[0].padding == (1, 1) and q[0].bias is not None
    x = torch.randn(32, 3, 8, 8, device=device)
    target = (x.mean((1, 2, 3)) > 0).long()
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(q(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_convert_root_rules_and_errors():
    assert isinstance(lowbit.convert(torch.nn.Linear(4, 3), "q4"), Q4Linear)
    m = _mlp()
    q = lowbit.convert(m, None, rules=[("2", "q4")])
    assert isinstance(q[2], Q4Linear) and type(q[0]) is torch.nn.Linear
    assert lowbit.convert(m, "q8", inplace=True) is m and isinstance(m[0], Q8Linear)
    with pytest.raises(ValueError, match="kind"):
        lowbit.convert(_mlp(), "q3")
    with pytest.raises(ValueError, match="padding_mode"):
        lowbit.convert(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding_mode="reflect")), "q4")


def test_convert_pattern_arguments():
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    # a single string would be read as one pattern per character: refused, as lowbit.quantize does
    with pytest.raises(TypeError, match=r"exclude takes a list of fnmatch patterns, not a string: got 'head'"):
        lowbit.convert(m, "q8", exclude="head")
    with pytest.raises(TypeError, match="include takes a list"):
        lowbit.convert(m, "q8", include="0")
    with pytest.raises(TypeError, match="exclude must hold str patterns, got 2"):
        lowbit.convert(m, "q8", exclude=[2])
    with pytest.raises(TypeError, match="include must be a list"):
        lowbit.convert(m, "q8", include=3)
    q = lowbit.convert(m, "q8", include=None, exclude=None)  # None: the defaults
    assert isinstance(q[0], Q8Linear) and isinstance(q[2], Q8Linear)
    q = lowbit.convert(m, "q8", exclude=("2",))
    assert isinstance(q[0], Q8Linear) and type(q[2]) is torch.nn.Linear
    with pytest.raises(TypeError, match=r"each rule must be a \(pattern, kind\) pair"):
        lowbit.convert(m, "q4", rules=["0"])
    with pytest.raises(TypeError, match="rules must be a list"):
        lowbit.convert(m, "q4", rules="0")
    with pytest.raises(ValueError, match="rule kind"):
        lowbit.convert(m, "q4", rules=[("0", "q2")])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        lowbit.convert("model", "q8")
    with pytest.raises(ValueError, match="dtype"):
        lowbit.convert(m, "q8", dtype=torch.int32)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        lowbit.convert(m, "q8", inplace="yes")


@pytest.mark.parametrize("inplace", [False, True])
def test_convert_keeps_a_shared_module_shared(inplace):
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(lin, torch.nn.ReLU(), lin)
    x = torch.randn(16, 8)
    y_float = model(x).detach()
    q = lowbit.convert(model, "q8", inplace=inplace)
    assert isinstance(q[0], Q8Linear) and q[0] is q[2]  # one layer at both names: the weight stays tied
    assert (type(model[0]) is torch.nn.Linear) != inplace
    assert torch.equal(q[0].weight, lin.weight) and len(list(q.parameters())) == 4  # weight, bias_a, scale_a, bias
    y = q(x)
    assert ref.rel_err(y, y_float) < 0.1
    y.square().mean().backward()  # both uses feed the one weight's gradient
    assert q[0].weight.grad is not None and q[0].weight.grad.abs().sum() > 0
    # a shared block: its Linear is converted once, seen at 'a.0' and 'b.0'
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    q = lowbit.convert(torch.nn.ModuleDict({"a": block, "b": block}), "q4", inplace=inplace)
    assert isinstance(q["a"][0], Q4Linear) and q["a"][0] is q["b"][0]
    # names of one module that the patterns convert differently: refused
    with pytest.raises(ValueError, match=r"used at 2 names \(tied\).*'0' -> Q8Linear, '2' -> float"):
        lowbit.convert(torch.nn.Sequential(lin, torch.nn.ReLU(), lin), "q8", exclude=["2"])
    with pytest.raises(ValueError, match="tied"):
        lowbit.convert(torch.nn.Sequential(lin, torch.nn.ReLU(), lin), "q8", rules=[("2", "q4")])
    # a shared module that is not converted (a ReLU, or a Conv2d under q8) is no conflict
    conv = torch.nn.Conv2d(2, 2, 1)
    q = lowbit.convert(torch.nn.Sequential(conv, conv), "q8", exclude=["1"])
    assert type(q[0]) is torch.nn.Conv2d and q[0] is q[1]


def test_tied_parameters_are_reported():
    """A Linear whose weight Parameter is also another module's (an LLM's lm_head tied to its embedding)
    is converted / quantized to a layer with its own copy: both tools warn that the tie is broken, and
    modules without shared parameters convert silently."""
    import warnings

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 64)
            self.body = torch.nn.Linear(64, 64)
            self.head = torch.nn.Linear(64, 50, bias=False)
            self.head.weight = self.emb.weight

    for tool in (lambda m: lowbit.convert(m, "q8"),
                 lambda m: lowbit.quantize(m, bits=4, group_size=32, progress=False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tool(LM())
        tied = [str(w.message) for w in caught if "tied parameters" in str(w.message)]
        assert len(tied) == 1 and "head.weight is also emb.weight" in tied[0], tied
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tool(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)))
        assert not [w for w in caught if "tied parameters" in str(w.message)]
