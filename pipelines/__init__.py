"""The stage scripts: `python pipelines/<stage>.py` in a checkout, `rlrf <stage>` (rlrf.pipelines.<stage>) anywhere."""
