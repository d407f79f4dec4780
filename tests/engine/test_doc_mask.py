"""model.doc_masking: attention inside each packed document (SDPA with a block-causal mask on CPU)."""

from __future__ import annotations

import pytest
import torch

from leanlm.engine.config import ModelConfig, load_config
from leanlm.engine.doc_mask import DocumentBoundary, build_mask, document_ids
from leanlm.engine.model import LLaMA
from leanlm.engine.trainer import train

BOS, EOS = 1, 2


def _model(doc_masking: bool, **kw) -> LLaMA:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, doc_masking=doc_masking, **kw)
    model = LLaMA(cfg, vocab_size=50, max_seq_len=64)
    with torch.no_grad():  # weights far from uniform attention: leaking across documents shows
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(6)
    model.set_document_boundary(BOS, EOS)
    return model.eval()


def _doc(n: int, seed: int) -> torch.Tensor:
    body = torch.randint(3, 50, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor([BOS]), body, torch.tensor([EOS])])


def test_a_document_inside_a_packed_row_computes_what_it_computes_alone():
    model = _model(True)
    tail, doc, head = _doc(9, 0)[3:], _doc(20, 1), _doc(30, 2)[:12]  # partial, whole, partial
    row = torch.cat([tail, doc, head])[None]  # (1, 50)
    with torch.no_grad():
        packed = model(row)
        alone = model(doc[None])
        first = model(tail[None])
    start = len(tail)
    assert (packed[0, start : start + len(doc)] - alone[0]).abs().max().item() < 1e-5
    assert (packed[0, :start] - first[0]).abs().max().item() < 1e-5  # the leading partial document
    plain = _model(False)
    with torch.no_grad():
        leaked = plain(row)[0, start : start + len(doc)]
    assert (leaked - alone[0]).abs().max().item() > 1e-2  # without masking the document sees its neighbour


def test_off_is_todays_causal_path_bitwise():
    row = torch.cat([_doc(10, 0), _doc(20, 1)])[None]
    a, b = _model(False), _model(True)
    b.cfg = ModelConfig(**{**b.cfg.__dict__, "doc_masking": False})
    with torch.no_grad():
        assert torch.equal(a(row), b(row))


def test_eos_only_tokenizers_start_a_document_after_each_eos():
    tokens = torch.tensor([[5, 2, 7, 8, 2, 9]])
    assert document_ids(tokens, DocumentBoundary.of(-1, 2)).tolist() == [[0, 0, 1, 1, 1, 2]]
    assert document_ids(torch.tensor([[5, 1, 7, 1]]), DocumentBoundary.of(1, 2)).tolist() == [[0, 1, 1, 2]]
    mask = build_mask(tokens, DocumentBoundary.of(-1, 2)).dense
    assert mask.shape == (1, 1, 6, 6) and mask[0, 0].diagonal().all()  # every query keeps itself
    assert not mask[0, 0, 2, 1] and mask[0, 0, 3, 2] and not mask[0, 0, 2, 3]


def test_gradients_agree_with_activation_checkpointing():
    row = torch.cat([_doc(10, 0), _doc(20, 1)])[None]
    grads = []
    for ckpt in (False, True):
        model = _model(True, activation_checkpointing=ckpt).train()
        model(row[:, :-1], targets=row[:, 1:]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    "extra",
    [
        ["optim.name=frugal", "model.activation_checkpointing=true"],
        ["optim.name=frugal", "optim.step_in_backward=true", "train.batch_size=2", "train.micro_batch_size=2"],
        ["optim.name=galore", "model.lost.enabled=true", "model.lost.rank=8"],
    ],
)
def test_masked_runs_train_evaluate_and_resume_bitwise(tiny_base, corpus_dir, tmp_path, extra):
    import json

    # short documents (a few lines of code each), so that every 64-token row holds several
    lines = [ln for f in sorted(corpus_dir.glob("*.py"))[:6] for ln in f.read_text().splitlines() if ln.strip()]
    docs = ["\n".join(lines[i : i + 3]) for i in range(0, len(lines), 3)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    short = [*tiny_base, f"data.source={tmp_path / 'docs.jsonl'}", "train.seq_len=64", *extra]
    base = [*short, "model.doc_masking=true"]
    full = train(load_config(None, [*base, f"train.out_dir={tmp_path / 'full'}"]))
    part = [*base, f"train.out_dir={tmp_path / 'part'}"]
    train(load_config(None, part), stop_at=3)
    resumed = train(load_config(None, [*part, "train.resume=auto"]))
    assert full.losses[3:] == resumed.losses and resumed.final.loss == full.final.loss
    plain = train(load_config(None, [*short, f"train.out_dir={tmp_path / 'p'}"]))
    assert plain.losses[0] != full.losses[0] and plain.final.loss != full.final.loss  # masking shows


@pytest.mark.gpu
def test_flex_attention_on_cuda_equals_the_sdpa_mask():
    """The CUDA path (compiled flex_attention with a BlockMask) against the CPU path's SDPA mask."""
    from leanlm.engine.doc_mask import AttentionMask, attend

    torch.manual_seed(0)
    tokens = torch.cat([_doc(100, 0), _doc(60, 1), _doc(90, 2)])[None, :256].cuda()
    q, k, v = (torch.randn(1, 4, 256, 64, device="cuda") for _ in range(3))
    boundary = DocumentBoundary.of(BOS, EOS)
    flex = attend(q, k, v, build_mask(tokens, boundary))
    dense = build_mask(tokens.cpu(), boundary).dense.cuda()
    sdpa = attend(q, k, v, AttentionMask(dense=dense))
    torch.testing.assert_close(flex, sdpa, atol=2e-3, rtol=2e-3)
