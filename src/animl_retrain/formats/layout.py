"""Every file and folder the stages hand each other, named once.

Each stage writes into its own output folder (one KFP artifact); the next stages find what they need there under
these names. A stage takes the names it reads from here, never from the stage that writes them, so no stage
imports another. Grouped by the stage that writes them; ``docs/data-contracts.md`` describes their contents.
"""

from __future__ import annotations

from animl_retrain.core.report import REPORT_NAME
from animl_retrain.formats import model_folder

# Every stage.
STAGE_REPORT_FILE = REPORT_NAME  # report.json: counts, problems with their reason, seconds
SUMMARY_FILE = "summary.md"  # export, split, evaluate: the summary the Kubeflow UI shows

# export
EXPORT_FILE = "export.json"  # the exact input, for provenance
IMAGES_TABLE = "images.csv"  # formats.tables.IMAGES (download writes its own, of the images on disk)
OBJECTS_TABLE = "objects.csv"  # formats.tables.OBJECTS
LABEL_SPEC_FILE = "label_spec.json"  # the label spec in canonical form (formats.labelspec)

# download
IMAGES_DIR = "images"  # the full-size images, under their safe relative ``file`` paths

# cct-to-md
GROUND_TRUTH_FILE = "ground_truth.json"  # the export's boxes in MegaDetector format

# detect
DETECTIONS_FILE = "detections.json"  # MegaDetector format 1.6
DETECT_CHECKPOINT_DIR = "checkpoint"  # shards of finished images while the stage runs

# crop
CROPS_DIR = "crops"  # one JPEG per box, already at the training size
CROPS_TABLE = "crops.csv"  # formats.tables.CROPS

# split
SPLIT_TABLE = "split.csv"  # formats.tables.SPLIT
LABEL_INDEX_FILE = model_folder.LABEL_INDEX_FILE  # {"0": label, ...}: the model's output order (train copies it)

# train
MODEL_FILE = model_folder.MODEL_FILES["pytorch"]  # model.pt: the self-describing checkpoint (modeling.checkpoint)
PREPROCESSING_FILE = model_folder.PREPROCESSING_FILE  # vision.preprocessing.Preprocessing.to_json()
MLFLOW_RUN_FILE = "mlflow_run.json"  # {"run_id", "experiment"} of the training run

# evaluate
METRICS_FILE = "metrics.json"
THRESHOLDS_FILE = "thresholds.json"  # the invasive classes' confidence thresholds
CONFUSION_FILE = "confusion_matrix.csv"
HTML_REPORT_FILE = "report.html"

# register
REGISTRATION_FILE = "registration.json"
REGISTRATION_SUMMARY_FILE = "registration.md"

# deploy
PACKAGE_DIR = "package"  # the model folder that was exported, checked and packaged (formats.model_folder)
MODEL_TARBALL = "model.tar.gz"  # the TorchServe archive, for SageMaker
DEPLOYMENT_FILE = "deployment.json"
DEPLOYMENT_SUMMARY_FILE = "deployment.md"
MLMODEL_FILE = "mlmodel.json"  # Animl's MLModel record
CATEGORY_CONFIG_FILE = "category_config.json"

# status (the exit handler)
STATUS_FILE = "status.json"
