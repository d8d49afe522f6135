"""TCP_NODELAY on btd's DICOM associations (listener and result sender), on loopback with pynetdicom
on both sides: without it each DIMSE message can wait for the peer's delayed ACK (52 ms per C-STORE
measured against Orthanc)."""

from __future__ import annotations

import socket

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from app.transports.pacs import processing
from app.transports.pacs.listener import Listener, ListenerOptions
from app.transports.pacs.network import disable_nagle
from app.transports.pacs.processing import CStoreSender, DicomNode, Processor, RetryPolicy, StudyTracker
from tests.api.helpers import free_port
from tests.pacs.dicom_checks import mr_slice


def _nodelay(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


class _Unused:
    """Classifier and sender both: this test only opens an association, nothing is classified or sent."""

    description = "unused"

    def send(self, objects) -> None:
        raise AssertionError("nothing is sent in this test")


def test_the_listener_sets_nodelay_on_the_associations_it_accepts():
    processor = Processor(_Unused(), _Unused(), StudyTracker("unused", idle_s=0.3), RetryPolicy(retries=0))
    listener = Listener(ListenerOptions(port=0, study_idle_s=0.3), processor)
    listener.start()
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="BTD")
        assert assoc.is_established
        try:
            served = listener._server.active_associations
            assert len(served) == 1
            assert _nodelay(served[0].dul.socket.socket)
            assert not _nodelay(assoc.dul.socket.socket)  # pynetdicom's default: the handler is what sets it
        finally:
            assoc.release()
    finally:
        listener.stop(10)


def test_the_result_sender_sets_nodelay_on_its_association(monkeypatch):
    seen: list[bool] = []

    def recording(event) -> None:
        disable_nagle(event)
        seen.append(_nodelay(event.assoc.dul.socket.socket))

    monkeypatch.setattr(processing, "tcp_handlers", lambda: [(evt.EVT_CONN_OPEN, recording)])
    stored: list[str] = []

    def on_store(event) -> int:
        stored.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    scp = AE(ae_title="STORE")
    scp.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        CStoreSender(DicomNode("STORE", "127.0.0.1", port)).send([mr_slice(sop_uid="1.2.3.9.1")])
    finally:
        server.shutdown()
    assert stored == ["1.2.3.9.1"] and seen == [True]


def test_a_socket_that_is_not_tcp_is_left_alone():
    left, right = socket.socketpair()
    try:
        class Event:
            class assoc:
                class dul:
                    class socket:
                        pass

        Event.assoc.dul.socket.socket = left
        disable_nagle(Event)  # AF_UNIX: no TCP option to set, and no error
    finally:
        left.close()
        right.close()
