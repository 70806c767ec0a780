"""What did the fine-tune write? Read the demo pairs' updates as tokens.

    python examples/token_readouts.py            # medical and math pairs

For each pair: the weight lens (:func:`tv_lens.read_tokens`) over every head circuit and MLP
matrix, scored against the domain's word list (:func:`tv_lens.domain_score`: medical drug,
condition and symptom words; digits for math), and the activation-difference lens
(:func:`tv_lens.activation_difference_lens`) on general-domain texts that never mention the
fine-tuning facts.
"""

from __future__ import annotations

import pandas as pd

import tv_lens
from tv_lens.demo import load_pair
from tv_lens.demo.corpus import build_corpora, domain_token_ids


def show(df: pd.DataFrame, component: str, direction: int, sign: int, side: str,
         source: str = "update") -> str:
    rows = df[(df.component == component) & (df.source == source) & (df.direction == direction)
              & (df.sign == sign) & (df.side == side)].sort_values("rank")
    return " ".join(rows.token.astype(str))


def main() -> None:
    general = [ex.text for ex in build_corpora(0)["general"].eval[:64]]
    for domain in ("medical", "math"):
        pair = load_pair(domain)
        words = domain_token_ids(pair.tokenizer, domain)
        tokens = tv_lens.read_tokens(pair, progress=False)
        scores = tv_lens.domain_score(tokens, words)
        print(f"== {domain}: {len(words)} domain tokens of {pair.spec.d_vocab}")
        for source in ("update", "base"):
            best = scores[scores.source == source].iloc[0]
            print(f"weight lens, best {source} direction: {best.component} direction {best.direction} "
                  f"sign {best.sign:+d} ({best.side}): {best.hits}/{best.k} domain tokens, "
                  f"{best.expected:.2f} expected by chance (p = {best.p_value:.1e})")
            print("   ", show(tokens, best.component, best.direction, best.sign, best.side, source))
        mlp_out = scores[(scores.source == "update") & (scores.direction == 0)
                         & scores.component.str.endswith(".mlp.W_out")]
        top = mlp_out.sort_values("hits", ascending=False).drop_duplicates("component").sort_values("component")
        print("weight lens, top ΔW_out direction per layer (better sign): "
              + ", ".join(f"{r.component} {r.hits}/{r.k}" for r in top.itertuples()))
        lens = tv_lens.activation_difference_lens(pair, general, positions=5)
        for layer, g in lens.groupby("layer"):
            hits = int(g.token_id.isin(words).sum())
            print(f"activation-difference lens, layer {layer}: {hits}/{len(g)} domain tokens "
                  f"({len(g) * len(words) / pair.spec.d_vocab:.2f} by chance): "
                  + " ".join(g.token.astype(str).head(12)))


if __name__ == "__main__":
    main()
