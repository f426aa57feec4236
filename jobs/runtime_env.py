"""Print the runtime environment (JSON) that jobs/submit.sh gives `ray job submit`.

The cluster installs the uploaded working directory with pip (Ray substitutes the unpacked
folder for the placeholder; a literal "." would be resolved in an empty scratch folder),
unless RAYSSEG_PREINSTALLED=1 says the cluster's image already has raysseg. Endpoint, region
and MLflow settings are forwarded from this shell. Credentials are not: a runtime env is shown
in the Ray dashboard and written to Ray's logs, so the nodes must have their own (an instance
profile, a Kubernetes secret, or the environment of `ray start`; see cluster_configs/README.md).
"""
import json
import os

FORWARDED = ("AWS_ENDPOINT_URL", "AWS_REGION", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "HF_HUB_OFFLINE")

env = {"env_vars": {k: os.environ[k] for k in FORWARDED if k in os.environ}}
if os.environ.get("RAYSSEG_PREINSTALLED") != "1":
    env["pip"] = ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"]
print(json.dumps(env))
