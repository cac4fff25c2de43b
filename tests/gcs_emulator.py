"""`python tests/gcs_emulator.py PORT BUCKET`: gcp-storage-emulator in memory on 127.0.0.1, with
one fix for tensorstore (Orbax's storage layer).

The emulator's object downloads lack the `x-goog-generation` header that GCS sends and that
tensorstore's gcs driver reads to know which version of an object it got (without it:
"Malformed StorageGeneration"); this adds it, and x-goog-metageneration, to every download.
"""

import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
  except Exception:  # noqa: BLE001 - not found: the response already says so.
    return
  response['x-goog-generation'] = obj['generation']
  response['x-goog-metageneration'] = obj['metageneration']


objects.download = download  # objects.get(alt=media) calls it by this name...
server.HANDLERS = tuple(  # ...and the routing table holds the function itself.
    (regex, {method: download if handler is _download else handler
             for method, handler in handlers.items()})
    for regex, handlers in server.HANDLERS)

if __name__ == '__main__':
  port, bucket = int(sys.argv[1]), sys.argv[2]
  server.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket).run()
