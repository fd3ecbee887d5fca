"""torch's recurrent layers and cells at the operation level (lrpcpp.models.operations.recurrent): the
same relevance as their steps written out with torch's ops, which the mode rules one by one; a
packed batch gives each sequence the relevance it has alone; a bias-free LSTM conserves."""

import lrpcpp
import pytest
import torch
from test_operation_functions import _Wrapped
from torch import nn
from torch.nn import functional as F


def _written_out(rnn, x):
    """``rnn``'s output (batch first, zero initial state) written out step by step with torch's ops, as
    a model of one's own would: the operation level rules each of them."""
    kind = rnn.nonlinearity if type(rnn) is nn.RNN else type(rnn).__name__.lower()
    seq, steps = x, range(x.shape[1])
    for layer in range(rnn.num_layers):
        outs = []
        for reverse in (False, True)[: 2 if rnn.bidirectional else 1]:
            names = [f"{n}_l{layer}" + ("_reverse" if reverse else "") for n in ("weight_ih", "weight_hh")]
            w_ih, w_hh = (getattr(rnn, n) for n in names)
            b_ih, b_hh = (getattr(rnn, n.replace("weight", "bias"), None) for n in names)
            h = c = torch.zeros(x.shape[0], rnn.hidden_size, dtype=x.dtype)
            ys = {}
            for t in reversed(steps) if reverse else steps:
                xi, hh = F.linear(seq[:, t], w_ih, b_ih), F.linear(h, w_hh, b_hh)
                if kind == "lstm":
                    i, f, g, o = (xi + hh).chunk(4, -1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                elif kind == "gru":
                    (x_r, x_z, x_n), (h_r, h_z, h_n) = xi.chunk(3, -1), hh.chunk(3, -1)
                    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
                    h = (1 - z) * torch.tanh(x_n + r * h_n) + z * h
                else:
                    h = torch.tanh(xi + hh) if kind == "tanh" else torch.relu(xi + hh)
                ys[t] = h
            outs.append(torch.stack([ys[t] for t in steps], 1))
        seq = torch.cat(outs, -1)
    return seq


class _WrittenOut(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return _written_out(self.rnn, x)


_RECURRENT = {
    "nn.LSTM": lambda: nn.LSTM(8, 4, batch_first=True),
    "nn.LSTM, 2 layers, bidirectional": lambda: nn.LSTM(8, 4, num_layers=2, bidirectional=True, batch_first=True),
    "nn.GRU": lambda: nn.GRU(8, 4, batch_first=True),
    "nn.GRU, 2 layers, bidirectional, no biases": lambda: nn.GRU(
        8, 4, 2, bias=False, batch_first=True, bidirectional=True
    ),
    "nn.RNN (tanh)": lambda: nn.RNN(8, 4, batch_first=True),
    "nn.RNN (relu), bidirectional": lambda: nn.RNN(8, 4, nonlinearity="relu", batch_first=True, bidirectional=True),
}


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("name", sorted(_RECURRENT))
def test_a_recurrent_layer_is_ruled_as_its_steps_written_out(name, method):
    torch.manual_seed(0)
    rnn = _RECURRENT[name]().double()
    width = rnn.hidden_size * (2 if rnn.bidirectional else 1)
    model, reference = (
        _Wrapped(nn.Sequential(rnn, _First(), nn.Linear(width, 8))),
        _Wrapped(nn.Sequential(_WrittenOut(rnn), nn.Linear(width, 8))),
    )
    reference.a, reference.b, reference.body[1] = model.a, model.b, model.body[2]
    model, reference = model.double().eval(), reference.double().eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", method=method, strict=True)
    want = lrpcpp.attribute(reference, inputs_embeds=x, level="operations", method=method, strict=True)
    assert (
        got.coverage.ruled[
            lrpcpp.models.tracking.op_name(_FUSED[type(rnn), rnn.nonlinearity if type(rnn) is nn.RNN else None])
        ]
        == 1
    )
    with torch.no_grad():  # torch's fused value (of the frozen model: with weights that require grad, or
        # not, torch's own recurrent and linear kernels may round differently)
        assert torch.equal(got.output, model.requires_grad_(False)(x).gather(1, got.target[:, None])[:, 0])
    torch.testing.assert_close(got.output, want.output, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-9, atol=1e-12)


class _First(nn.Module):
    def forward(self, out):
        return out[0]


_FUSED = {
    (nn.LSTM, None): torch.lstm,
    (nn.GRU, None): torch.gru,
    (nn.RNN, "tanh"): torch.rnn_tanh,
    (nn.RNN, "relu"): torch.rnn_relu,
}


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.RNN])
def test_a_recurrent_layer_without_biases_conserves_relevance(rnn):
    # AttnLRP on a bias-free LSTM (or tanh RNN) from a zero state: the identity rule on the gates and
    # the tanh, products split evenly, linear maps without biases: the relevance sums to the output
    torch.manual_seed(0)
    model = _Wrapped(nn.Sequential(rnn(8, 4, bias=False, batch_first=True), _First(), nn.Linear(4, 8, bias=False)))
    for layer in (model.a, model.b):
        layer.bias = None
    model = model.double().eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    torch.testing.assert_close(got.relevance.sum((1, 2)), got.output, rtol=1e-8, atol=1e-10)


class _Cells(nn.Module):
    """A recurrent cell run over the sequence."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x):
        state, ys = None, []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            ys.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(ys, 1)


@pytest.mark.parametrize("cell, layer", [(nn.LSTMCell, nn.LSTM), (nn.GRUCell, nn.GRU), (nn.RNNCell, nn.RNN)])
def test_a_recurrent_cell_is_ruled_as_its_layer(cell, layer):
    torch.manual_seed(0)
    rnn = layer(8, 4, batch_first=True).double()
    step = cell(8, 4).double()
    step.load_state_dict({k.replace("_l0", ""): v for k, v in rnn.state_dict().items()})
    model = _Wrapped(nn.Sequential(_Cells(step), nn.Linear(4, 8))).double().eval()
    fused = _Wrapped(nn.Sequential(rnn, _First(), nn.Linear(4, 8))).double().eval()
    fused.a, fused.b, fused.body[2] = model.a, model.b, model.body[1]
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", strict=True)
    want = lrpcpp.attribute(fused, inputs_embeds=x, level="operations", strict=True)
    torch.testing.assert_close(got.relevance, want.relevance, rtol=1e-9, atol=1e-12)


class _Packed(nn.Module):
    """``rnn`` over the sequences of the given lengths, packed (the longest first), padded back with zeros."""

    def __init__(self, rnn, lengths):
        super().__init__()
        self.rnn, self.lengths = rnn, lengths

    def forward(self, x):
        packed = nn.utils.rnn.pack_padded_sequence(x, self.lengths, batch_first=True, enforce_sorted=False)
        return nn.utils.rnn.pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])[0]


@pytest.mark.parametrize("layer", [nn.LSTM, nn.GRU])
def test_a_packed_sequence_has_the_relevance_of_each_sequence_alone(layer):
    # three sequences of lengths 3, 5, 2 (packed after sorting them): each item's relevance is that of its
    # own positions run alone, through two stacked bidirectional layers; its padding gets none
    torch.manual_seed(0)
    rnn, lengths = layer(8, 4, num_layers=2, bidirectional=True, batch_first=True).double(), torch.tensor([3, 5, 2])
    model = _Wrapped(nn.Sequential(_Packed(rnn, lengths), nn.Linear(8, 8))).double().eval()
    alone = _Wrapped(nn.Sequential(rnn, _First(), nn.Linear(8, 8))).double().eval()
    alone.a, alone.b, alone.body[2] = model.a, model.b, model.body[1]
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    got = lrpcpp.attribute(model, inputs_embeds=x, level="operations", target=0, strict=True)
    assert got.coverage.ruled[lrpcpp.models.tracking.op_name(_FUSED[layer, None])] == 1
    for i, n in enumerate(lengths.tolist()):
        want = lrpcpp.attribute(alone, inputs_embeds=x[i : i + 1, :n], level="operations", target=0, strict=True)
        torch.testing.assert_close(got.relevance[i, :n], want.relevance[0], rtol=1e-9, atol=1e-12)
        assert not got.relevance[i, n:].any()


def test_a_recurrent_layer_with_a_projection_is_named_as_unruled():
    model = _Wrapped(nn.Sequential(nn.LSTM(8, 4, proj_size=2, batch_first=True), _First(), nn.Linear(2, 8)))
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    with pytest.raises(lrpcpp.models.operations.UnruledOperationError, match="torch.lstm"):
        lrpcpp.attribute(model.double().eval(), inputs_embeds=x, level="operations", strict=True)
