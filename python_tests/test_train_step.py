"""TrainStep: the eager step is exactly the hand-written loop; cuda_graph=True
falls back to it off CUDA (with one warning); the capture rules (static batch,
capturable optimiser, no dropout, no nested CUDA-graph compile, no host sync in
the stats) are checked on CPU through their helpers, and end to end on a GPU."""
import copy

import pytest
import torch
import torch.nn as nn

import ater_ext
from _counting import CountMatmuls
from ater_ext import objectives, passes, train_step
from ater_ext.train_step import TrainStep, check_capturable_optimizer, check_static_batch

CUDA = torch.cuda.is_available()


def bn_model(dtype=torch.float64, dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(12, 24), nn.BatchNorm1d(24), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(24, 4)).to(dtype)


def batches(n, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(3)
    return [(torch.rand(10, 3, 2, 2, generator=g, dtype=dtype).to(device),
             torch.randint(0, 4, (10,), generator=g).to(device)) for _ in range(n)]


def ater(model, x, y):
    return objectives.ater_loss(model, x, y, eps_adv=0.5, eps=0.7)


def manual_loop(model, opt, data):
    losses = []
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss, _ = ater(model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def state_of(model):
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


@pytest.mark.parametrize("objective", ["ater_loss", "energy_reg"])
def test_backward_into_parameters_gives_the_same_gradients_and_skips_x_max(objective):
    """Same parameter gradients as a plain backward, one matrix product fewer (the input
    gradient at x_max), and no .grad for leaves that are not parameters."""
    def loss_of(model, x, y):
        if objective == "ater_loss":
            return ater(model, x, y)[0]
        return nn.functional.cross_entropy(model(x), y) + 0.3 * ater_ext.energy_reg(model, x, y, eps=0.5)

    x, y = batches(1)[0]
    grads, matmuls = {}, {}
    for how in ("plain", "into_parameters"):
        model = bn_model()
        outside = torch.zeros((), dtype=torch.float64, requires_grad=True)  # a leaf that is no parameter
        opt_only = torch.ones((), dtype=torch.float64, requires_grad=True)  # optimised, not in the model
        opt = torch.optim.SGD([*model.parameters(), opt_only], lr=0.1)
        loss = loss_of(model, x, y) + outside * opt_only
        with CountMatmuls() as counter:
            if how == "plain":
                loss.backward()
            else:
                ater_ext.backward_into_parameters(loss, model, opt)
        matmuls[how] = counter.count
        grads[how] = [p.grad for p in model.parameters()] + [opt_only.grad]
        assert (outside.grad is None) == (how == "into_parameters")
    for a, b in zip(grads["plain"], grads["into_parameters"]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert matmuls["into_parameters"] == matmuls["plain"] - 1, matmuls


def test_backward_into_parameters_without_parameters_is_a_plain_backward():
    leaf = torch.ones(3, requires_grad=True)
    ater_ext.backward_into_parameters((2 * leaf).sum(), nn.Identity())
    assert torch.equal(leaf.grad, torch.full((3,), 2.0))


def test_eager_step_is_the_hand_written_loop():
    data = batches(3)
    ref_model = bn_model()
    model = copy.deepcopy(ref_model)
    ref_losses = manual_loop(ref_model, torch.optim.Adam(ref_model.parameters(), lr=1e-2), data)
    step = TrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-2), ater)
    losses = [step(x, y) for x, y in data]
    assert not step.captured
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    assert all(torch.equal(a, b) for a, b in zip(state_of(model), state_of(ref_model)))
    assert not losses[0].requires_grad


def test_cuda_graph_off_cuda_runs_eagerly_and_warns_once():
    data = batches(3)
    ref_model = bn_model()
    model = copy.deepcopy(ref_model)
    manual_loop(ref_model, torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9), data)
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), ater, cuda_graph=True)
    with pytest.warns(UserWarning, match="cuda_graph=True with x on cpu") as record:
        for x, y in data:
            step(x, y)
    assert len(record) == 1
    assert not step.captured
    assert all(torch.equal(a, b) for a, b in zip(state_of(model), state_of(ref_model)))


def test_loss_fn_may_return_a_bare_scalar():
    x, y = batches(1)[0]
    model = bn_model()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     lambda m, x, y: nn.functional.cross_entropy(m(x), y))
    loss = step(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("bad", [lambda m, x, y: m(x), lambda m, x, y: (3.0, {})])
def test_loss_fn_must_return_a_scalar_tensor(bad):
    x, y = batches(1)[0]
    model = bn_model()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), bad)
    with pytest.raises(TypeError, match=r"TrainStep: loss_fn must return a scalar tensor"):
        step(x, y)


def test_static_batch_check_names_the_shapes():
    x, y = batches(1)[0]
    check_static_batch((x, y), (x.clone(), y.clone()))
    with pytest.raises(ValueError, match=r"captured with x \[10, 3, 2, 2\] torch.float64 on cpu, got \[9, 3, 2, 2\]"):
        check_static_batch((x, y), (x[:9], y[:9]))
    with pytest.raises(ValueError, match=r"captured with y \[10\] torch.int64 on cpu, got \[10\] torch.int32"):
        check_static_batch((x, y), (x, y.int()))


def test_capturable_optimizer_check():
    params = list(bn_model().parameters())
    check_capturable_optimizer(torch.optim.SGD(params, lr=0.1, momentum=0.9))  # no step counters
    check_capturable_optimizer(torch.optim.Adam(params, capturable=True))
    check_capturable_optimizer(torch.optim.AdamW(params, capturable=True))
    for opt in (torch.optim.Adam(params), torch.optim.Adagrad(params)):  # host-side step counters
        with pytest.raises(ValueError, match=f"capturable=True .*; got {type(opt).__name__} without it"):
            check_capturable_optimizer(opt)


def test_last_stats_are_the_objectives_floats():
    x, y = batches(1)[0]
    model = bn_model()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), ater)
    assert step.last_stats is None
    loss = step(x, y)
    assert set(step.last_stats) == {"loss", "ce", "adv", "energy", "xmax_grad_ratio"}
    assert step.last_stats["loss"] == pytest.approx(float(loss))
    bare = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     lambda m, x, y: nn.functional.cross_entropy(m(x), y))
    bare(x, y)
    assert bare.last_stats is None



def test_last_stats_read_tensor_and_float_stats():
    model = bn_model()

    def loss_fn(m, x, y):
        loss = nn.functional.cross_entropy(m(x), y)
        return loss, {"ce": loss.detach(), "const": 2.0}

    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    loss = step(*batches(1)[0])
    assert step.last_stats == {"ce": float(loss), "const": 2.0}

@pytest.fixture
def capturing(monkeypatch):
    """Makes the CPU look like a stream under CUDA graph capture, to run the capture-time branches."""
    monkeypatch.setattr(passes, "is_capturing", lambda device: True)
    monkeypatch.setattr(objectives, "is_capturing", lambda device: True)


def test_stats_stay_tensors_during_capture(capturing):
    x, y = batches(1)[0]
    loss, stats = ater(bn_model(), x, y)
    assert set(stats) == {"loss", "ce", "adv", "energy", "xmax_grad_ratio"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in stats.values())
    torch.testing.assert_close(stats["loss"], loss.detach().float())


def test_stats_are_floats_outside_capture():
    x, y = batches(1)[0]
    _, stats = ater(bn_model(), x, y)
    assert all(isinstance(v, float) for v in stats.values())


def test_capture_refuses_active_dropout(capturing):
    x, y = batches(1)[0]
    with pytest.raises(RuntimeError, match="dropout masks .* CUDA graph"):
        ater(bn_model(dropout=0.3), x, y)
    model = bn_model(dropout=0.3).eval()  # inactive dropout is fine
    ater(model, x, y)


def test_capture_refuses_nested_cuda_graph_compile(capturing):
    x, y = batches(1)[0]
    with pytest.raises(RuntimeError, match="compile='reduce-overhead' records CUDA graphs"):
        objectives.ater_loss(bn_model(), x, y, compile="reduce-overhead")


def test_ddp_wrapped_model_is_refused_for_capture():
    model = nn.DataParallel(bn_model())
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), ater, cuda_graph=True)
    with pytest.raises(ValueError, match="does not capture DataParallel"):
        step._first_step_and_capture(*batches(1)[0])


def test_exported():
    assert ater_ext.TrainStep is train_step.TrainStep


# --- on a GPU: capture and replay for real --------------------------------------------------

cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@cuda_only
def test_cuda_graph_replay_matches_eager_steps():
    # fp64 and SGD: the finite difference amplifies rounding by 1 / xi, and Adam would
    # turn the rounding noise in the gradients of biases that feed a BatchNorm (true
    # gradient 0) into O(lr) updates; either could hide a real mismatch or fake one
    data = batches(5, dtype=torch.float64, device="cuda")
    ref_model = bn_model(torch.float64).cuda()
    model = copy.deepcopy(ref_model)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9)
    ref_losses = manual_loop(ref_model, ref_opt, data[:1])
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), ater, cuda_graph=True)
    losses = [step(*data[0])]
    assert step.captured
    # after the first call, .grad holds that step's gradients, not the capture's scratch
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    ref_losses += manual_loop(ref_model, ref_opt, data[1:])
    losses += [step(x, y) for x, y in data[1:]]
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-7, atol=1e-9)
    for a, b in zip(state_of(model), state_of(ref_model)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    # the stats of the last replay are that step's
    assert step.last_stats["loss"] == pytest.approx(float(losses[-1]))


@cuda_only
def test_cuda_graph_with_capturable_adam_trains():
    data = batches(4, dtype=torch.float32, device="cuda")
    model = bn_model(torch.float32).cuda()
    before = state_of(model)
    step = TrainStep(model, torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True), ater, cuda_graph=True)
    losses = torch.stack([step(x, y) for x, y in data])
    assert step.captured and bool(torch.isfinite(losses).all())
    assert not all(torch.equal(a, b) for a, b in zip(before, state_of(model)))


@cuda_only
def test_cuda_graph_refuses_outer_autocast():
    x, y = batches(1, dtype=torch.float32, device="cuda")[0]
    model = bn_model(torch.float32).cuda()
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), ater, cuda_graph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16), pytest.raises(ValueError, match="inside torch.autocast"):
        step(x, y)


@cuda_only
def test_cuda_graph_rejects_a_batch_of_another_shape():
    data = batches(2, dtype=torch.float32, device="cuda")
    model = bn_model(torch.float32).cuda()
    step = TrainStep(model, torch.optim.Adam(model.parameters(), capturable=True), ater, cuda_graph=True)
    step(*data[0])
    with pytest.raises(ValueError, match="captured with x"):
        step(data[1][0][:5], data[1][1][:5])


@cuda_only
def test_cuda_graph_capture_refuses_dropout_and_plain_adam():
    x, y = batches(1, dtype=torch.float32, device="cuda")[0]
    model = bn_model(torch.float32).cuda()
    with pytest.raises(ValueError, match="capturable=True"):
        TrainStep(model, torch.optim.Adam(model.parameters()), ater, cuda_graph=True)(x, y)
    model = bn_model(torch.float32, dropout=0.3).cuda()
    step = TrainStep(model, torch.optim.Adam(model.parameters(), capturable=True), ater, cuda_graph=True)
    with pytest.raises(RuntimeError, match="capturing the step in a CUDA graph failed .*dropout"):
        step(x, y)
    assert not step.captured
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    with pytest.raises(RuntimeError, match="could not be captured"):  # no second eager step, no retry
        step(x, y)
