"""The core: what a reduction is (spec), who performs it (registry), where it applies (discovery), the verbs
`reduce`/`materialize` (api), the record a reduced model carries, shared-tensor bookkeeping, MLP hidden-unit surgery,
per-recipe training hooks, the NaN/Inf scan (finite) and the protocol reduced layers speak to generic code. Knows no
particular strategy."""
