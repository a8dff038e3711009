"""generate with prompts and prefixes under greedy, beam search, several returned sequences and sampling.

The reference is a decode loop written here over the same wrapped model's forward
(the whole sequence re-run every step, no cache), so it shares nothing with the
cache plumbing that generate uses.
"""
import pytest
import torch

import pelthub as ph
from pelthub.errors import ConfigError
from tests import tiny
from tests.tiny import perturb

NEW = 3
CONFIGS = {"prefix": ph.Prefix(length=2, hidden=None), "prompt": ph.Prompt(length=3)}


def model_and_ids(arch, kind):
    model = ph.attach(tiny.BUILDERS[arch](), CONFIGS[kind]).eval()
    perturb(model, scale=0.5)
    ids = torch.randint(3, tiny.VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    return model, ids


def step_logprobs(model, arch, ids, out):
    """Log-probabilities of the next token after `out` (decoder-only: the continued ids)."""
    with torch.no_grad():
        if arch == "t5":
            logits = model(input_ids=ids.repeat_interleave(out.shape[0] // ids.shape[0], 0),
                           decoder_input_ids=out).logits
        else:
            logits = model(input_ids=out, attention_mask=torch.ones_like(out)).logits
    return logits[:, -1].float().log_softmax(-1)


def start(model, arch, ids):
    if arch == "t5":
        return torch.full((ids.shape[0], 1), model.base.config.decoder_start_token_id)
    return ids


def greedy(model, arch, ids):
    out = start(model, arch, ids)
    for _ in range(NEW):
        out = torch.cat([out, step_logprobs(model, arch, ids, out).argmax(-1, keepdim=True)], 1)
    return out


def beam(model, arch, ids, width):
    """Plain beam search without EOS or length penalty: keep the `width` best sums of log-probabilities."""
    best = []
    for b in range(ids.shape[0]):
        beams, scores = start(model, arch, ids[b:b + 1]), torch.zeros(1)
        for _ in range(NEW):
            lp = step_logprobs(model, arch, ids[b:b + 1].expand(beams.shape[0], -1) if arch != "t5" else
                               ids[b:b + 1], beams)
            total = (scores[:, None] + lp).flatten()
            top = total.topk(width).indices
            beams = torch.cat([beams[top // lp.shape[1]], (top % lp.shape[1])[:, None]], 1)
            scores = total[top]
        best.append(beams[0])
    return torch.stack(best)


ARCHS = ["gpt2", "llama", "t5"]


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_equals_a_hand_written_loop(arch, kind):
    model, ids = model_and_ids(arch, kind)
    got = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    assert torch.equal(got, greedy(model, arch, ids))


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_beam_search_equals_a_hand_written_beam_search(arch, kind):
    model, ids = model_and_ids(arch, kind)
    got = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, num_beams=3, do_sample=False,
                         length_penalty=0.0, early_stopping=False)
    assert torch.equal(got, beam(model, arch, ids, 3))


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("arch", ARCHS)
def test_several_returned_sequences_each_continue_their_own_input(arch, kind):
    model, ids = model_and_ids(arch, kind)
    torch.manual_seed(0)
    got = model.generate(ids, max_new_tokens=NEW, do_sample=True, num_return_sequences=2)
    assert got.shape[0] == 2 * ids.shape[0]
    if arch != "t5":
        assert torch.equal(got[:, :ids.shape[1]], ids.repeat_interleave(2, 0))


def test_a_prefix_with_use_cache_false_is_refused_not_dropped():
    model, ids = model_and_ids("gpt2", "prefix")
    with pytest.raises(ConfigError, match="use_cache=True"):
        model.generate(ids, max_new_tokens=2, use_cache=False)
