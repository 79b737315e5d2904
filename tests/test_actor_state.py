"""actor_state.json: what the actor keeps beside its torch_dist checkpoint, and bad files refused in one
line naming the file and the field before any tensor is read."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_nft.actor_state import FILE, ActorState
from megatron_nft.errors import CheckpointError


def test_a_training_state_round_trips(tmp_path):
    state = ActorState(steps=7, adam_step=6, scheduler={"num_steps": 6, "max_lr": 1e-3})
    state.write(tmp_path)
    assert json.loads((tmp_path / FILE).read_text()) == {"steps": 7, "adam_step": 6,
                                                         "scheduler": {"num_steps": 6, "max_lr": 1e-3}}
    assert ActorState.read(tmp_path, with_optimizer=True) == state
    assert ActorState.read(tmp_path, with_optimizer=False) == ActorState(steps=7)


def test_an_imported_model_has_weights_only(tmp_path):
    ActorState().write(tmp_path)  # what hf_to_megatron writes
    assert json.loads((tmp_path / FILE).read_text()) == {"steps": 0}
    assert ActorState.read(tmp_path, with_optimizer=False) == ActorState(steps=0)
    with pytest.raises(CheckpointError, match=r"actor_state\.json: no optimizer state .*without the optimizer"):
        ActorState.read(tmp_path, with_optimizer=True)


@pytest.mark.parametrize("content, needle", [
    (None, "missing"),
    ("{not json", "not readable JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"steps": -1}', "steps=-1, expected a non-negative integer"),
    ('{"steps": true}', "steps=True"),
    ('{"steps": 3, "adam_step": 2.5, "scheduler": {}}', "adam_step=2.5"),
    ('{"steps": 3, "adam_step": 2, "scheduler": [1]}', "scheduler=[1]"),
])
def test_bad_files_are_one_line_naming_file_and_field(tmp_path, content, needle):
    if content is not None:
        (tmp_path / FILE).write_text(content)
    with pytest.raises(CheckpointError) as info:
        ActorState.read(tmp_path, with_optimizer=True)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(tmp_path / FILE)) and needle in message, message


def test_capture_and_restore_give_each_adam_state_its_own_step():
    """The repair megatron_workarounds.restore_adam_steps makes after DistributedOptimizer.load_state_dict
    (which gives every parameter one shared 'step' tensor): torch Adam then advances each count once per
    update, as in an uninterrupted run (the reference: a torch Adam stepped the same number of times)."""
    from types import SimpleNamespace

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    reference = torch.optim.Adam([p.detach().clone().requires_grad_() for p in params], lr=0.1)
    opt = torch.optim.Adam(params, lr=0.1)
    for o in (opt, reference):
        for _ in range(2):
            for p in o.param_groups[0]["params"]:
                p.grad = torch.ones_like(p)
            o.step()
    scheduler = SimpleNamespace(state_dict=lambda: {"num_steps": 2}, load_state_dict=lambda sd: loaded.append(sd))
    loaded: list = []
    state = ActorState.capture(steps=2, optimizer=SimpleNamespace(optimizer=opt), scheduler=scheduler)
    assert state == ActorState(steps=2, adam_step=2, scheduler={"num_steps": 2})
    shared = torch.tensor(2.0)  # what megatron-core's load leaves behind
    for st in opt.state.values():
        st["step"] = shared
    state.restore_optimizer(SimpleNamespace(optimizer=opt), scheduler)
    assert loaded == [{"num_steps": 2}]
    for o in (opt, reference):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        o.step()
    assert [int(st["step"]) for st in opt.state.values()] == [3, 3]
    for p, q in zip(opt.param_groups[0]["params"], reference.param_groups[0]["params"]):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
