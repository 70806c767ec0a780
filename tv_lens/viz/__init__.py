"""Views of tv_lens results: plotly figures, the circuit graph, circuitsvis views.

Imported only when used (``import tv_lens`` does not import plotly or circuitsvis). Every
function returns a figure or view and shows nothing; in Jupyter they render inline.

- figures (:mod:`tv_lens.viz.figures`): :func:`heads`, :func:`neurons`, :func:`summary`,
  :func:`spectrum`, :func:`patching`, :func:`attribution_vs_exact`, :func:`composition_grid`;
- :func:`circuit` (:mod:`tv_lens.viz.circuit`): the model as a graph of what changed;
- model zoos (:mod:`tv_lens.viz.zoo`): :func:`zoo_similarity`, :func:`zoo_heads`,
  :func:`zoo_matrices`;
- circuitsvis views (:mod:`tv_lens.viz.views`): :func:`attention`, :func:`token_loss_difference`,
  :func:`token_effect`, :func:`head_tokens`.
"""

from tv_lens.viz.circuit import circuit
from tv_lens.viz.figures import (attribution_vs_exact, composition_grid, heads, neurons, patching,
                                 spectrum, summary)
from tv_lens.viz.views import View, attention, head_tokens, token_effect, token_loss_difference
from tv_lens.viz.zoo import zoo_heads, zoo_matrices, zoo_similarity

__all__ = ["View", "attention", "attribution_vs_exact", "circuit", "composition_grid", "head_tokens",
           "heads", "neurons", "patching", "spectrum", "summary", "token_effect",
           "token_loss_difference", "zoo_heads", "zoo_matrices", "zoo_similarity"]
