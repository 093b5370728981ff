"""FSDP2 (``peftc.distributed.fully_shard``) under torchrun: two CPU processes (gloo) train a compiled
model whose base is sharded layer by layer; they equal one process on the global batch, hold half
the base, save a PEFT adapter folder, and generate what the unsharded model generates."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_llama
from safetensors.torch import load_file

import peftc

WORKER = Path(__file__).parent / "workers" / "fsdp_train.py"
RULES = peftc.LoRA(r=4, init=False).on(peftc.linear(r".*\.(q|v)_proj"))
sys.path.insert(0, str(WORKER.parent))
from fsdp_train import GREEDY, prompts  # noqa: E402

# -- one process (a process group of one): the same code path, and what bad input gets -----------------


@pytest.fixture
def group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_equals_unsharded_in_train_and_eval(group):
    """Sharded over one rank, the graph runs through FSDP2's hooks and must compute what the plain
    graph computes; eval mode needs a new trace, taken with the shards gathered."""
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    plain = peftc.compile(make_llama(), RULES, backend="eager").train()
    cm = peftc.distributed.fully_shard(peftc.compile(make_llama(), RULES, backend="eager").train())
    for model in (plain, cm):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in cm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.full_tensor(), grads[name], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(cm.eval()(input_ids=ids).logits, plain.eval()(input_ids=ids).logits,
                                   atol=1e-6, rtol=0)


def test_bad_input_gets_clear_errors(group):
    from conftest import assert_unchanged, snapshot
    from torch.distributed.device_mesh import DeviceMesh

    model = make_llama()
    cm = peftc.compile(model, RULES, backend="eager")
    cm.merge()
    before = snapshot(model)
    with pytest.raises(peftc.MergeError, match="unmerge"):
        peftc.distributed.fully_shard(cm)
    assert_unchanged(model, before)
    cm.unmerge()
    before = snapshot(model)
    with pytest.raises(peftc.PeftcError, match="doesn't fit the process group"):
        peftc.distributed.fully_shard(cm, DeviceMesh("cpu", torch.zeros(1, 1, dtype=torch.int)))
    with pytest.raises(peftc.PeftcError, match="no layer to shard"):
        peftc.distributed.fully_shard(cm, layers=r"nothing\.here")
    assert_unchanged(model, before)

    inductor = peftc.compile(make_llama(), RULES)  # nothing compiles until a call
    with pytest.raises(peftc.PeftcError, match="backend='eager'"):
        peftc.distributed.fully_shard(inductor)

    from torch.distributed.fsdp import fully_shard

    root_only = fully_shard(peftc.compile(make_llama(), RULES, backend="eager"))
    with pytest.raises(peftc.PeftcError, match="root before its layers"):
        peftc.distributed.fully_shard(root_only)

    peftc.distributed.fully_shard(cm)
    with pytest.raises(peftc.MergeError, match="FSDP shards"):
        cm.merge()
    with pytest.raises(peftc.PeftcError, match="sharded already"):
        peftc.distributed.fully_shard(cm)


def test_qlora_base_is_refused(group):
    cm = peftc.compile(make_llama(), RULES, backend="eager", quantize="nf4")
    with pytest.raises(peftc.QuantizationError, match="4-bit"):
        peftc.distributed.fully_shard(cm)
    assert cm.programs.sharding is None and not any(peftc.distributed.is_sharded(p) for p in cm.parameters())


def test_sharding_before_compile_blames_fsdp(group):
    from torch.distributed.fsdp import fully_shard

    model = make_llama()
    for layer in model.model.layers:
        fully_shard(layer)
    with pytest.raises(peftc.TraceError, match="peftc.distributed.fully_shard"):
        peftc.compile(model, RULES, backend="eager")


def test_the_users_own_per_layer_calls_are_kept(group):
    """torch's per-layer recipe applied to the compiled model (as Accelerate's FSDP2 plugin does):
    peftc.distributed.fully_shard keeps those units and makes the graph read their shards."""
    from torch.distributed.fsdp import fully_shard

    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(2))
    plain = peftc.compile(make_llama(), RULES, backend="eager").train()
    cm = peftc.compile(make_llama(), RULES, backend="eager").train()
    layers = list(cm.base_model.model.layers)
    for layer in layers:
        fully_shard(layer)
    fully_shard(cm)
    peftc.distributed.fully_shard(cm)
    assert all(fully_shard.state(layer) is not None for layer in layers)
    torch.testing.assert_close(cm(input_ids=ids, labels=ids).loss, plain(input_ids=ids, labels=ids).loss,
                               atol=1e-6, rtol=0)


def test_a_root_sharded_behind_peftcs_back_is_refused_not_run_unsharded(group):
    """Accelerate's FSDP2 plugin shards the embeddings, the tail and the root of a model it is handed;
    the graph of a signature already traced would go on reading the whole weights. The call says so."""
    from torch.distributed.fsdp import fully_shard

    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(3))
    cm = peftc.compile(make_llama(), RULES, backend="eager").train()
    cm(input_ids=ids, labels=ids)  # this signature's graph exists: no new trace would stop the next call
    fully_shard(cm.base_model.model.embed_tokens)
    fully_shard(cm)
    with pytest.raises(peftc.PeftcError, match="before accelerator.prepare"):
        cm(input_ids=ids, labels=ids)


def test_accelerates_own_units_are_refused(group):
    """Accelerate's FSDP2 plugin, told the layer class, shards each layer, the embeddings, the final norm
    with the head (one unit), then the root: the graph would read the last two outside their units'
    hooks, so peftc refuses to adopt them (unrefused, the first call fails deep in torch)."""
    from torch.distributed.fsdp import fully_shard

    cm = peftc.compile(make_llama(), RULES, backend="eager")
    base = cm.base_model
    for layer in base.model.layers:
        fully_shard(layer)
    fully_shard(base.model.embed_tokens)
    fully_shard([base.model.norm, base.lm_head], reshard_after_forward=False)
    fully_shard(cm)
    with pytest.raises(peftc.PeftcError, match=r"model\.embed_tokens was sharded as an FSDP unit of its own.*"
                                               r"before accelerator\.prepare"):
        peftc.distributed.fully_shard(cm)
    assert cm.programs.sharding is None


# -- two ranks under torchrun (the launch started with the module) ------------------------------------


class _Launch:
    """One torchrun launch (2 ranks) running every variant of the worker, started at once and waited
    for when a test needs what it wrote: meanwhile this process runs the one-rank tests (the ranks
    keep about one core busy, waiting on each other)."""

    def __init__(self, out: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(peftc.__file__).parents[1])}
        self.out, self.log = out, out / "stderr.txt"
        with open(self.log, "w") as log:  # a file, not a pipe nobody reads while the ranks run
            self.process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node=2", str(WORKER), str(out)],
                                            env=env, stdout=subprocess.DEVNULL, stderr=log)

    @functools.cached_property
    def folder(self) -> Path:
        """The folder the ranks wrote, once they are done."""
        code = self.process.wait(timeout=600)
        assert code == 0, self.log.read_text()[-3000:]
        return self.out


@pytest.fixture(scope="module", autouse=True)
def launch(request, tmp_path_factory):
    """The launch, started with this module's first test if any selected test needs it."""
    if not any("launched" in item.fixturenames for item in request.session.items):
        yield None
        return
    launch = _Launch(tmp_path_factory.mktemp("fsdp"))
    yield launch
    if launch.process.poll() is None:  # a test failed before waiting: end the launch this module started
        launch.process.kill()
        launch.process.wait()


@pytest.fixture
def launched(launch) -> Path:
    return launch.folder


def _ranks(folder: Path) -> list[dict[str, torch.Tensor]]:
    return [load_file(folder / f"rank{r}.safetensors") for r in range(2)]


@functools.cache
def _one_process():
    """The same steps in one process, without checkpointing (which must not change a number): the mean
    of the two halves' losses, backpropagated at once."""
    cm = peftc.compile(make_llama(), RULES, backend="eager").train()
    opt = torch.optim.SGD([p for p in cm.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(1, 100, (8, 10), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        halves = [cm(input_ids=h, labels=h).loss for h in ids.chunk(2)]
        losses.append(torch.stack([h.detach() for h in halves]))
        (sum(halves) / 2).backward()
        opt.step()
        opt.zero_grad()
    return cm, torch.stack(losses, dim=1)  # [rank, step]


@pytest.mark.parametrize("variant", ["plain", "checkpointing", "accelerate"])
def test_fsdp_two_ranks_equal_one_process(launched, variant):
    ranks = _ranks(launched / variant)
    cm, losses = _one_process()
    for r in range(2):
        torch.testing.assert_close(ranks[r]["losses"], losses[r], atol=1e-5, rtol=0)
    trained = {n: p.detach() for n, p in cm.named_parameters() if p.requires_grad}
    for rank in ranks:
        assert rank.keys() - {"losses", "memory", "generated", "logits", "stopped"} == trained.keys()
        for name, value in trained.items():
            torch.testing.assert_close(rank[name], value, atol=1e-5, rtol=0)

    # Memory: each rank holds half the base (its shards), and no whole copy anywhere in the model,
    # its graphs or its traces (the generation graphs' too); while a layer runs, only that layer's
    # weights are gathered.
    for rank in ranks:
        resident, whole, layer, gathered = rank["memory"].tolist()
        assert resident <= whole / 2 + layer, (resident, whole, layer)
        assert gathered <= layer, (gathered, layer)

    # save_pretrained gathered the adapters on rank 0: PEFT loads the folder and gets the trained weights.
    from peft import PeftModel

    peft = PeftModel.from_pretrained(make_llama(), str(launched / variant / "adapter"))
    ours = {n.removeprefix("peftc.adapters.default."): p for n, p in trained.items()}
    theirs = {n.removeprefix("base_model.model.").replace(".default.weight", ""): p.detach()
              for n, p in peft.named_parameters() if "lora_" in n}
    assert theirs.keys() == ours.keys()
    for name, value in ours.items():
        torch.testing.assert_close(theirs[name], value, atol=1e-6, rtol=0)


def test_fsdp_generate_equals_unsharded(launched):
    """Greedy cm.generate on the trained sharded model, each rank on its own prompts, gives the
    unsharded compiled model's tokens and logits; and when rank 0's rows all stop after one token
    while rank 1's go on, rank 0 steps along (FSDP's gathers are collective) and both are right."""
    ranks = _ranks(launched / "plain")
    cm = _one_process()[0].eval()
    for rank, ask in zip(ranks, prompts(2).chunk(2), strict=True):
        mask = torch.ones_like(ask)
        with torch.no_grad():
            ref = cm.generate(input_ids=ask, attention_mask=mask, **GREEDY)
            eos = ref.sequences[:, ask.shape[1]].tolist() if rank is ranks[0] else 2
            stopped = cm.generate(input_ids=ask, attention_mask=mask, **GREEDY, eos_token_id=eos)
        assert torch.equal(rank["generated"], ref.sequences)
        torch.testing.assert_close(rank["logits"], torch.stack(ref.logits, dim=1), atol=1e-5, rtol=0)
        assert torch.equal(rank["stopped"], stopped.sequences)
    assert ranks[0]["stopped"].shape[1] == ask.shape[1] + 1 < ranks[1]["stopped"].shape[1]
