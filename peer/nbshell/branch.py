# Run inside NetBox by peer/netbox.py (`netbox shell -c`): a ready branch named PEER_BRANCH_NAME,
# provisioned synchronously (save() would queue an RQ job, and no rqworker runs), then chosen as
# the diode plugin's default branch. Idempotent. Prints one JSON line.
import json
import os

from django.contrib.auth import get_user_model
from netbox_branching.choices import BranchStatusChoices
from netbox_branching.models import Branch
from netbox_diode_plugin.models import Setting

name = os.environ["PEER_BRANCH_NAME"]
branch = Branch.objects.filter(name=name).first()
if branch is None:
    branch = Branch(name=name, owner=get_user_model().objects.get(username="admin"))
    branch.save(provision=False)
    branch.provision(user=branch.owner)
    branch.refresh_from_db()
if branch.status != BranchStatusChoices.READY:
    raise SystemExit(f"branch {name} is {branch.status}, not ready")
setting = Setting.objects.first()  # the single row the plugin's migration creates
setting.branch_id = branch.pk
setting.save()
print(json.dumps({"schema_id": branch.schema_id, "name": branch.name, "status": branch.status}))
