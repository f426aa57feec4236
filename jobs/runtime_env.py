"""Print the runtime environment (JSON) that jobs/submit.sh gives `ray job submit`.

The cluster installs the uploaded working directory with pip (Ray substitutes the unpacked
folder for the placeholder; a literal "." would be resolved in an empty scratch folder),
unless RAYSSEG_PREINSTALLED=1 says the cluster's image already has raysseg. Object-storage
credentials and MLflow settings are forwarded from this shell when set; on a cluster with
an instance profile or a Kubernetes secret, leave them unset here.
"""
import json
import os

FORWARDED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION",
             "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "HF_HUB_OFFLINE")

env = {"env_vars": {k: os.environ[k] for k in FORWARDED if k in os.environ}}
if os.environ.get("RAYSSEG_PREINSTALLED") != "1":
    env["pip"] = ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"]
print(json.dumps(env))
