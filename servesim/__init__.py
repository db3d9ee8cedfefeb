"""The `servesim` tool over the simulator: its command line (`cli`) and the searches that run many simulations
(`capacity`, `sweep`, `planner`, `disagg_search`). Depends on `sim`, `calibrate` and `backend`; nothing under them
depends on it."""
