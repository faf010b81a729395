"""ARM -> MDM adaptation vs an MDM from scratch, same budget (validation ELBO, nats/token).

Pre-trains a small ARM on the demo corpus for --arm-steps, then trains MDMs for --mdm-steps each:
from scratch (the baseline), adapted with the shift (DiffuLLaMA / Dream default), adapted without it, and adapted
with attention annealing over the first --anneal-steps; and, as the stricter baseline, an MDM from scratch given the
ARM's steps too (the same total compute as ARM pre-training + adaptation). Every MDM run sees the same data, schedule
and seed; the numbers are each run's final validation ELBO (stratified t, fixed mask draws: smdm.train.evaluate).
Finished runs (OUT/NAME/summary.json) are reused when the script runs again.

    nice -n 19 python benchmarks/adaptation.py --work-dir runs/adaptation
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smdm.corpus import default_corpus
from smdm.data.prepare import PrepareConfig, prepare_corpus, read_documents
from smdm.tokenizer import Tokenizer, train_bpe
from smdm.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("runs/adaptation"))
    parser.add_argument("--model", default="tiny-1m")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--arm-steps", type=int, default=600)
    parser.add_argument("--mdm-steps", type=int, default=300)
    parser.add_argument("--anneal-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    tokenizer_path = work / "tokenizer.json"
    corpus = [default_corpus(work / "cache")]
    if not tokenizer_path.exists():
        train_bpe(read_documents(corpus), 384, tokenizer_path)
    data = work / "tokens"
    if not (data / "manifest.json").exists():
        prepare_corpus(corpus, Tokenizer.from_file(tokenizer_path), data, PrepareConfig(val_fraction=0.02),
                       progress=False)

    def run(name: str, steps: int, **options) -> float:
        summary = work / name / "summary.json"
        if summary.exists():
            return json.loads(summary.read_text())["final_val_loss"]
        config = TrainConfig(data_dir=str(data), out_dir=str(work / name), model=args.model, seq_len=args.seq_len,
                             batch_size=args.batch_size, max_steps=steps, lr=3e-3, eval_every=10**9,
                             save_every=10**9, eval_blocks=64, eval_mc_samples=4, threads=args.threads,
                             progress=False, **options)
        return train(config)["final_val_loss"]

    results = {"arm": run("arm", args.arm_steps, objective="arm")}
    arm = str(work / "arm")
    results["mdm_scratch"] = run("mdm_scratch", args.mdm_steps, objective="mdm")
    results["mdm_adapted_shift"] = run("mdm_adapted_shift", args.mdm_steps, objective="mdm", init_from=arm)
    results["mdm_adapted_noshift"] = run("mdm_adapted_noshift", args.mdm_steps, objective="mdm", init_from=arm,
                                         adapt_shift=False)
    results["mdm_adapted_shift_anneal"] = run("mdm_adapted_shift_anneal", args.mdm_steps, objective="mdm",
                                              init_from=arm, attention_anneal_steps=args.anneal_steps)
    results["mdm_scratch_total_budget"] = run("mdm_scratch_total_budget", args.arm_steps + args.mdm_steps,
                                              objective="mdm")
    print(json.dumps({"settings": vars(args) | {"work_dir": str(work)}, "val_loss_nats_per_token": results},
                     indent=2))


if __name__ == "__main__":
    main()
