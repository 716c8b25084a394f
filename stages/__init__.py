"""One thin module per DVC stage: parse params, call imtok, write outs and metrics."""
