#!/usr/bin/env bash
# The crossover study of docs/data-constrained.md: MDMs and ARMs of two sizes (tiny-1m, tiny-3m) trained for many
# epochs over U = 12,500 and 25,000 unique tokens of the embedded corpus, then one fit over all of it (frontiers,
# crossovers against the closed form, reuse half-lives, plots into docs/data-constrained/crossover). About 2.5 hours
# of two idle cores; rerun after an interruption: finished runs are skipped, killed ones resume.
#   nice -n 19 bash configs/repeat-crossover.sh
set -euo pipefail
SMDM=${SMDM:-smdm}
SPECS="configs/repeat-crossover.json configs/repeat-crossover-u12k.json configs/repeat-crossover-u12k-3m.json"
for spec in $SPECS; do
  SPEC=$spec bash configs/repeat-cpu.sh
done
manifests=()
for spec in $SPECS; do manifests+=("runs/repeat/$(basename "$spec" .json)-manifest.json"); done
$SMDM scale repeat fit "${manifests[0]}" --also "${manifests[@]:1}" --out "${OUT:-docs/data-constrained/crossover}"
