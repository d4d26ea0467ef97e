"""nnU-Net's predictor, its three steps timed apart: preprocessing, the network's windows, export.

For estimating a case too long to run whole on a shared CPU (the clinical-size CT with nnU-Net's
default-size network): preprocessing and export do not depend on the weights, so they are timed here
on the real input, the number of windows is counted from the preprocessed shape, and ``--windows N``
times only N of them (the per-window time; the estimate is pre + windows x per-window + export).
Export is timed on logits of the right shape (zeros: nnU-Net resamples every class whatever the
values). One process per run, so ``peak_rss_mb`` is this run's own.

Usage (nnunetv2 installed; the default-size folder is what ``unetseg benchmark --against nnunet``
builds, ``nnunetbench.default_folder``):
  python scripts/nnunet-stage-times.py FOLDER INPUT.nrrd [--windows N] [--threads 2] [--json OUT]
"""

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("input")
    parser.add_argument("--windows", type=int, default=1, help="windows to time (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.data_iterators import PreprocessAdapterFromNpy
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(args.folder, use_folds=(0,),
                                                   checkpoint_name="checkpoint_final.pth")
    out = {"input": args.input, "threads": torch.get_num_threads()}
    t = time.perf_counter()
    data, props = SimpleITKIO().read_images([args.input])
    out["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    dct = next(PreprocessAdapterFromNpy([data], [None], [props], [None], predictor.plans_manager,
                                        predictor.dataset_json, predictor.configuration_manager,
                                        num_threads_in_multithreaded=1, verbose=False))
    out["preprocess_s"] = time.perf_counter() - t
    pre = dct["data"]
    out["preprocessed_shape"] = list(pre.shape[1:])
    slicers = predictor._internal_get_sliding_window_slicers(pre.shape[1:])
    out["windows"] = len(slicers)
    network = predictor.network.eval()
    network.load_state_dict(predictor.list_of_parameters[0])
    patch = [int(p) for p in predictor.configuration_manager.patch_size]
    times = []
    with torch.no_grad():
        for _ in range(args.windows):
            x = torch.zeros((1, pre.shape[0], *patch))
            t = time.perf_counter()
            network(x)
            times.append(time.perf_counter() - t)
    out["window_s"] = times
    n_classes = predictor.label_manager.num_segmentation_heads
    logits = torch.zeros((n_classes, *pre.shape[1:]), dtype=torch.float32)
    t = time.perf_counter()
    convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager,
        dct["data_properties"], return_probabilities=False)
    out["export_s"] = time.perf_counter() - t
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
