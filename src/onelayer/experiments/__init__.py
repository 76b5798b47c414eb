"""Experiments made of many runs: layer scans (:mod:`.scan`), strategy comparisons (:mod:`.compare`),
out-of-domain evaluation (:mod:`.ood`), specialist ensembles (:mod:`.specialists`) and the report of a
scan (:mod:`.report`), over run directories (:mod:`.rundir`) shared across torchrun ranks
(:mod:`.sharding`). Reading results (profiles, reports) never imports the training stack; running imports
it through :mod:`.recipes`."""
