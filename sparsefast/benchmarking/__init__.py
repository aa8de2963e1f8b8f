"""The benchmark library behind ``python -m sparsefast bench`` and ``pytest benchmarks``: cases and
inputs (:mod:`.cases`), the implementations compared and the reference check (:mod:`.runners`),
timing (:mod:`.timing`), tables / JSON / plot (:mod:`.report`)."""
