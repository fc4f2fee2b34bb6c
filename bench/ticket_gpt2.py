"""A GPT-2-shaped ticket: IMP with global magnitude pruning and rewinding to step k, then sparsify.

A Hugging Face GPT-2 built from a config (random init, nothing downloaded) learns a synthetic
language (tokens drawn from a fixed random Markov chain, so next-token accuracy has a ceiling
well above chance); the search prunes its attention and MLP projections (``Conv1D``, which
counts as linear) globally, rewinding survivors to step k. The ticket is then deployed with
``sparsify`` and its weight bytes and forward latency at batch 1 and 16 are measured against
the dense model (interleaved bursts, medians).

    python bench/ticket_gpt2.py --rounds 3 --iterations 300 --out runs

Needs transformers (in the dev extra).
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from sparse_lth import LotteryConfig, find_ticket, sparsify

VOCAB, SEQ = 256, 64


def markov_chain(seed: int = 0) -> torch.Tensor:
    """Next-token probabilities: each token has 4 likely successors (a learnable structure)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, VOCAB, generator=g)
    top = logits.topk(4, dim=1).indices
    logits.scatter_(1, top, logits.gather(1, top) + 6.0)
    return logits.softmax(1)


def sample(chain: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    tokens = torch.empty(n, SEQ, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, VOCAB, (n,), generator=generator)
    for t in range(1, SEQ):
        tokens[:, t] = torch.multinomial(chain[tokens[:, t - 1]], 1, generator=generator).squeeze(1)
    return tokens


def gpt2(layers: int = 4, width: int = 256, heads: int = 4):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=width, n_layer=layers, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def make_train_fn(train: torch.Tensor, val: torch.Tensor, batch_size: int = 32, lr: float = 1e-3):
    def evaluate(model) -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = model(val).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), val[:, 1:].reshape(-1)).item()
            accuracy = (logits.argmax(-1) == val[:, 1:]).float().mean().item()
        model.train()
        return loss, accuracy

    def train_fn(model, ctx):
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        order = torch.randperm(len(train))
        model.train()
        while ctx.steps < ctx.iterations:
            batch = train[order[(ctx.steps * batch_size) % (len(train) - batch_size):][:batch_size]]
            loss = model(batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ctx.step()
            if ctx.steps % 50 == 0:
                ctx.log(val_loss=evaluate(model)[0])
        loss, accuracy = evaluate(model)
        return {"accuracy": accuracy, "loss": loss}

    return train_fn


def model_bytes(model) -> int:
    """Bytes of every tensor the model keeps, each storage once (tied weights count once)."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def latency(dense, sparse, batch: int, bursts: int = 7, calls: int = 3) -> tuple[float, float]:
    """(dense s, sparse s) per forward, medians of alternated bursts (same input)."""
    import statistics
    import time

    x = torch.randint(0, VOCAB, (batch, SEQ))
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    with torch.no_grad():
        for model in (dense, sparse):
            model(x)  # warm
        for _ in range(bursts):
            for name, model in (("dense", dense), ("sparse", sparse)):
                start = time.perf_counter()
                for _ in range(calls):
                    model(x)
                times[name].append((time.perf_counter() - start) / calls)
    return statistics.median(times["dense"]), statistics.median(times["sparse"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--rewind", type=int, default=30, help="late rewinding to step k")
    ap.add_argument("--prune", type=float, default=0.54, help="share pruned per round (0.54: 10%% left after 3)")
    ap.add_argument("--out", default="runs")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    chain, g = markov_chain(), torch.Generator().manual_seed(1)
    train, val = sample(chain, 4096, g), sample(chain, 256, g)
    config = LotteryConfig(model="gpt2-4x256", dataset="markov256", rounds=args.rounds, iterations=args.iterations,
                           prune_fraction=args.prune, scope="global", output_layer="none",
                           rewind_iteration=args.rewind, controls=(), metric="accuracy")
    ticket = find_ticket(config, args.out, model_fn=lambda seed: gpt2(), train_fn=make_train_fn(train, val))
    print(ticket.table())

    # Deploy: the last round's trained weights, mask applied, as dense and as sparsified models.
    from sparse_lth.run_files import last_ticket

    mask, trained, _ = last_ticket(ticket.run_dir)
    dense = gpt2().eval()
    dense.load_state_dict(trained, strict=False)  # lm_head is tied to wte: not in the file twice
    sparse = sparsify(copy.deepcopy(dense), mask, format="csr", max_density=1.0).eval()
    print(f"\nprojections {100 * ticket.mask.density():.1f}% dense; weight bytes: dense "
          f"{model_bytes(dense) / 1e6:.2f} MB, sparse {model_bytes(sparse) / 1e6:.2f} MB")
    for batch in (1, 16):
        d, s = latency(dense, sparse, batch)
        print(f"batch {batch} x {SEQ} tokens: dense {1e3 * d:.2f} ms, sparse {1e3 * s:.2f} ms, {d / s:.2f}x "
              "(medians of 7 interleaved bursts)")


if __name__ == "__main__":
    main()
