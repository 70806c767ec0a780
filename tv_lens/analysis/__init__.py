"""Directional alignment: does an update amplify existing directions or write new ones?

``analyze(pair)`` answers that per head circuit, per neuron and per weight matrix, with the
random-update baseline beside every share (definitions: ``shared/METHODS.md``), in four tables:
``heads``, ``neurons``, ``matrices`` and ``summary``. The package is its pipeline, one job per
module, each importing only those above it in this list:

- :mod:`~tv_lens.analysis.labels`: the tables' columns, :class:`Thresholds`, and the labels
  (fixed thresholds, or calibrated by q-values);
- :mod:`~tv_lens.analysis.options`: :class:`AnalysisOptions`, what decides the numbers, shared
  by ``analyze`` and ``analyze_zoo``;
- :mod:`~tv_lens.analysis.rows`: one layer's rows from its base weights and updates;
- :mod:`~tv_lens.analysis.summary`: every layer's rows into an :class:`Analysis` (q-values,
  labels, the summary table);
- :mod:`~tv_lens.analysis.run`: ``analyze``, streaming the layers through ``rows`` (the zoo
  uses the same per-layer functions);
- :mod:`~tv_lens.analysis.spectrum`: one matrix's full spectrum (``matrix_spectrum``).

Nothing is imported here: ``tv_lens.analyze`` and the other public names load their module on
first use (:mod:`tv_lens`).
"""
