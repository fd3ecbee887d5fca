"""The operation level's rules of torch's fused recurrent layers (``torch.lstm``, ``torch.gru``,
``torch.rnn_tanh``, ``torch.rnn_relu``, the functions behind ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``)
and of their cells (``nn.LSTMCell``, ...): each step is unrolled with the rules that its written-out
form gets at the operation level (the identity rule on the gates' sigmoids and on tanh, products
split as :data:`~lrpcpp.models.operations.RULES` splits them), and the value is torch's own."""

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from ..tracking import with_gradient_of

State = List[Tensor]
Step = Callable[..., State]


def _activation(mode, f: Callable, pre: Tensor) -> Tensor:
    """``f(pre)`` with the identity rule where ``pre`` carries relevance (relu: its own gradient), marked
    as a gate (for CP-LRP), as the mode treats the call ``f(pre)``."""
    from .handlers import identity_rule  # (imported here: handlers.py holds this module's rules in its table)

    out = f(pre) if f is torch.relu else identity_rule(mode, f, pre)
    mode.mark_gate(out)
    return out


def _mul(mode, a: Tensor, b: Tensor) -> Tensor:
    from .handlers import products

    return torch.mul(*products(mode, (a, b)))


def _lstm(mode, x: Tensor, state: State, w_ih, w_hh, b_ih, b_hh) -> State:
    h, c = state
    i, f, g, o = (F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)).chunk(4, -1)
    i, f, o = (_activation(mode, torch.sigmoid, t) for t in (i, f, o))
    c = _mul(mode, f, c) + _mul(mode, i, _activation(mode, torch.tanh, g))
    return [_mul(mode, o, _activation(mode, torch.tanh, c)), c]


def _gru(mode, x: Tensor, state: State, w_ih, w_hh, b_ih, b_hh) -> State:
    (h,) = state
    (x_r, x_z, x_n), (h_r, h_z, h_n) = F.linear(x, w_ih, b_ih).chunk(3, -1), F.linear(h, w_hh, b_hh).chunk(3, -1)
    r, z = _activation(mode, torch.sigmoid, x_r + h_r), _activation(mode, torch.sigmoid, x_z + h_z)
    n = _activation(mode, torch.tanh, x_n + _mul(mode, r, h_n))
    return [_mul(mode, 1 - z, n) + _mul(mode, z, h)]


def _elman(f: Callable) -> Step:
    def step(mode, x: Tensor, state: State, w_ih, w_hh, b_ih, b_hh) -> State:
        return [_activation(mode, f, F.linear(x, w_ih, b_ih) + F.linear(state[0], w_hh, b_hh))]

    return step


def _with_value(out, rule: Sequence[Tensor]):
    """torch's values ``out`` (a tensor or a tuple) with the gradients of ``rule``."""
    if isinstance(out, Tensor):
        return with_gradient_of(out, rule[0])
    return type(out)(with_gradient_of(o, r) for o, r in zip(out, rule))


def _unrolled(mode, step: Step, input: Tensor, states: State, params, has_biases, layers, dirs, sizes=None):
    """The layers' output and final states (``[layers * dirs, batch, hidden]`` each), step by step.
    ``input``: ``[time, batch, features]``; or, with ``sizes`` (a packed sequence's batch sizes, one per
    step, falling), the steps' rows one after another."""
    per = 4 if has_biases else 2
    x = input
    finals: List[State] = [[] for _ in states]
    for layer in range(layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            weights = tuple((list(params[k * per : (k + 1) * per]) + [None, None])[:4])  # (w_ih, w_hh, b_ih, b_hh)
            initial = [s[k] for s in states]
            if sizes is None:
                ys, state = _run(mode, step, x, initial, weights, d == 1)
            else:
                ys, state = _run_packed(mode, step, x, initial, weights, d == 1, sizes)
            outs.append(ys)
            for final, s in zip(finals, state):
                final.append(s)
        x = torch.cat(outs, -1) if dirs == 2 else outs[0]
    return [x] + [torch.stack(f) for f in finals]


def _run(mode, step: Step, x: Tensor, state: State, weights, reverse: bool):
    """One direction of one layer over ``[time, batch, features]``: the outputs and the final state."""
    ys = [x[0]] * x.shape[0]
    for t in reversed(range(x.shape[0])) if reverse else range(x.shape[0]):
        state = step(mode, x[t], state, *weights)
        ys[t] = state[0]
    return torch.stack(ys), state


def _run_packed(mode, step: Step, x: Tensor, initial: State, weights, reverse: bool, sizes: List[int]):
    """:func:`_run` over a packed sequence: step t has the first ``sizes[t]`` sequences (the longest
    first). Forward, a sequence that ends leaves its state as its final one; in reverse, a sequence
    joins with its initial state at its last step."""
    starts = [sum(sizes[:t]) for t in range(len(sizes))]
    ys = [x[:0]] * len(sizes)
    if reverse:
        state = [s[:0] for s in initial]
        for t in reversed(range(len(sizes))):
            rows, n = x[starts[t] : starts[t] + sizes[t]], state[0].shape[0]
            # the sequences that join take their first step apart: their initial state carries relevance
            # only where the given one does, not where the others' states do
            parts = [step(mode, rows[:n], state, *weights)] if n else []
            if sizes[t] > n:
                parts.append(step(mode, rows[n:], [i[n : sizes[t]] for i in initial], *weights))
            state = [torch.cat(p) for p in zip(*parts)]
            ys[t] = state[0]
        return torch.cat(ys), state
    state = initial
    ended: List[State] = [[] for _ in initial]  # (the ended rows' states, first rows first)
    for t in range(len(sizes)):
        for e, s in zip(ended, state):
            e.insert(0, s[sizes[t] :])
        state = step(mode, x[starts[t] : starts[t] + sizes[t]], [s[: sizes[t]] for s in state], *weights)
        ys[t] = state[0]
    return torch.cat(ys), [torch.cat([s] + e) for s, e in zip(state, ended)]


def _layer(step: Step) -> Callable:
    def handler(mode, func, input, *args):
        # (input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first), or of a
        # packed sequence (data, batch_sizes, hx, params, has_biases, num_layers, dropout, train, bidirectional)
        packed = isinstance(args[0], Tensor) and not args[0].is_floating_point()
        if packed:
            sizes, (hx, params, has_biases, num_layers, dropout, train, bidirectional) = args[0], args[1:]
            batch_first = False
        else:
            sizes, (hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first) = None, args
        dirs = 2 if bidirectional else 1
        # (projections, dropout between layers: no rule, named as unruled)
        if input.dim() != (2 if packed else 3) or (train and dropout > 0):
            return NotImplemented
        if len(params) != num_layers * dirs * (4 if has_biases else 2):
            return NotImplemented
        with torch.no_grad():
            out = func(input, *args)
        states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
        x = input.transpose(0, 1) if batch_first else input
        sizes = None if sizes is None else sizes.tolist()
        rule = _unrolled(mode, step, x, states, params, has_biases, num_layers, dirs, sizes)
        if batch_first:
            rule[0] = rule[0].transpose(0, 1)
        return _with_value(out, rule)

    return handler


def _cell(step: Step) -> Callable:
    def handler(mode, func, input, hx, w_ih, w_hh, b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None):
        with torch.no_grad():
            out = func(input, hx, w_ih, w_hh, b_ih, b_hh)
        states = list(hx) if isinstance(hx, (list, tuple)) else [hx]
        return _with_value(out, step(mode, input, states, w_ih, w_hh, b_ih, b_hh))

    return handler


_RNN_TANH, _RNN_RELU = _elman(torch.tanh), _elman(torch.relu)
# torch function -> its handler (RULES in handlers.py)
RECURRENT = {
    torch.lstm: _layer(_lstm),
    torch.gru: _layer(_gru),
    torch.rnn_tanh: _layer(_RNN_TANH),
    torch.rnn_relu: _layer(_RNN_RELU),
    torch.lstm_cell: _cell(_lstm),
    torch.gru_cell: _cell(_gru),
    torch.rnn_tanh_cell: _cell(_RNN_TANH),
    torch.rnn_relu_cell: _cell(_RNN_RELU),
}

__all__ = ["RECURRENT"]
