"""The embedded broker: kombu's folder transport, with atomic message writes.

kombu's `filesystem` transport opens the message file under its final name and then
writes it, so a consumer polling the folder can pick up an empty file and crash its loop
with a JSON error (seen with the web server, beat and worker publishing at once). This
transport writes each message under a hidden name and renames it into place, which is
atomic on POSIX, so a consumer only ever sees whole messages. It is registered as
`cumulusfs://`; production uses Redis or RabbitMQ instead.
"""

from __future__ import annotations

import os
import uuid
from time import monotonic

from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: dict, **kwargs: object) -> None:
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        hidden = os.path.join(self.data_folder_out, "." + name + ".part")  # never matches a queue
        try:
            with open(hidden, "wb") as f:
                f.write(dumps(payload).encode())
            os.replace(hidden, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel


TRANSPORT_ALIASES.setdefault("cumulusfs", "controlplane.broker:Transport")
