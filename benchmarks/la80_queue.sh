#!/usr/bin/env bash
# The LA evidence of issues 16, 18 and 19 on a CPU, in the order its decisions need it: one seed of every
# 8-labelled row; the fidelity ladder's six rows that choose the CPU presets' data path (on the validation
# split), both seeds; its dropout row (the rule's step 2), both seeds; the intensity plan's rows (supervised
# and BCP, z-scored), both seeds; the other seeds of the 8-labelled rows; the ladder's "before issue 16"
# row (informative, chooses nothing); then the 16-labelled plan, the ablations and the 3x-longer check.
#
# Usage: benchmarks/la80_queue.sh [PYTHON]     (from the repository root; PYTHON defaults to .venv/bin/python)
# Needs data/LA_0.5 with all 80 training cases:
#   crln data prepare --src ../shared/data/LA --dst data/LA_0.5 --scale 0.5
# Resumable: run it again after an interruption. Finished runs are skipped; a cut-off run resumes from its
# latest checkpoint (every 50 iterations), and the result is the same as an uninterrupted run. It runs at
# nice 10 so that interactive work on the machine keeps priority. The tables and figures are rewritten in
# benchmarks/plans/ after every run.
set -euo pipefail
python=${1:-.venv/bin/python}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}  # this checkout's code, also from a worktree that shares a venv
# Exit 3: a (row, seed) diverged; the bench recorded it (diverged.json in its run folder), did the rest of the
# plan and never trains it again, so the queue goes on with the next plan rather than stop there.
bench() { nice -n 10 "$python" -m crln bench "$@" --no-progress || [ $? -eq 3 ]; }

bench benchmarks/plans/la80_cpu_8labels_3seeds.yaml --seed 1337
fidelity=benchmarks/plans/la80_cpu_fidelity.yaml
intensity=benchmarks/plans/la80_cpu_intensity.yaml
# The six rows that choose the data path (benchmarks/choose_cpu_defaults.py), both seeds, before anything else
paths=(--row 'issue-16 fixes' --row min-max --row 'Mean teacher (field' --row 'Mean teacher (the'
       --row 'CRLN, z-score' --row 'Mean teacher, z-score')
for seed in 1337 2024; do bench $fidelity --seed $seed "${paths[@]}"; done
for seed in 1337 2024; do bench $fidelity --seed $seed --row 'dropout 0.5'; done  # the rule's step 2
for seed in 1337 2024; do bench $intensity --seed $seed; done
bench benchmarks/plans/la80_cpu_8labels_3seeds.yaml --seed 2024
bench benchmarks/plans/la80_cpu_8labels_3seeds.yaml --seed 7
bench $fidelity
bench benchmarks/plans/la80_cpu_16labels_3seeds.yaml
bench benchmarks/plans/la80_cpu_8labels_ablations.yaml
bench benchmarks/plans/la80_cpu_8labels_3x.yaml
