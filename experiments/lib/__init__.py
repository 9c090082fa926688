"""The experiments' library: what the commands in `experiments/` share
(flags -> configs, one whole run, the comparisons, benchmark problems).
Nothing here is a command."""
