"""``mfd bench``: throughput and downtime of save, restore, migrate and live migration,
measured honestly: mfd beside QEMU 10 and beside the physical limits, on the same image, in
the same run, medians of interleaved repeats; a table, JSON and plots.

Modules: :mod:`~mfd.bench.options` (command line), :mod:`~mfd.bench.main` (one run),
:mod:`~mfd.bench.workspace` (image and work directories), :mod:`~mfd.bench.files` (save,
restore), :mod:`~mfd.bench.migration` (stopped guest over TCP), :mod:`~mfd.bench.live`
(running guests), :mod:`~mfd.bench.baselines` (limits), :mod:`~mfd.bench.runs` (configs,
repeats, progress, cleanup), :mod:`~mfd.bench.report` and :mod:`~mfd.bench.plots`.
"""
