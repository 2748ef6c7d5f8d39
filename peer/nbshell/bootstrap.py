# Run inside NetBox by peer/netbox.py (`netbox shell -c`): superuser admin/admin plus a v1 REST
# token with the fixed value PEER_NETBOX_TOKEN. Idempotent. Prints one JSON line.
import json
import os

from django.contrib.auth import get_user_model
from users.models import Token

value = os.environ["PEER_NETBOX_TOKEN"]
admin, _ = get_user_model().objects.get_or_create(username="admin")
admin.is_superuser = admin.is_active = True  # NetBox 4.7's User has no is_staff
admin.set_password("admin")
admin.save()
if not Token.objects.filter(plaintext=value).exists():
    token = Token(version=1, user=admin, token=value, description="reconciler peer harness")
    token.full_clean()
    token.save()
print(json.dumps({"user": admin.username, "token_id": Token.objects.get(plaintext=value).pk}))
