from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SettleKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SETTLE_ACK: _ClassVar[SettleKind]
    SETTLE_DEFER: _ClassVar[SettleKind]
    SETTLE_DISCARD: _ClassVar[SettleKind]
    SETTLE_EXTEND: _ClassVar[SettleKind]
    SETTLE_RELEASE: _ClassVar[SettleKind]
SETTLE_ACK: SettleKind
SETTLE_DEFER: SettleKind
SETTLE_DISCARD: SettleKind
SETTLE_EXTEND: SettleKind
SETTLE_RELEASE: SettleKind

class ConnectRequest(_message.Message):
    __slots__ = ("access_key",)
    ACCESS_KEY_FIELD_NUMBER: _ClassVar[int]
    access_key: str
    def __init__(self, access_key: _Optional[str] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("success", "client_id", "client_hash", "server_config", "error_message")
    class ServerConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_HASH_FIELD_NUMBER: _ClassVar[int]
    SERVER_CONFIG_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    client_id: str
    client_hash: str
    server_config: _containers.ScalarMap[str, str]
    error_message: str
    def __init__(self, success: _Optional[bool] = ..., client_id: _Optional[str] = ..., client_hash: _Optional[str] = ..., server_config: _Optional[_Mapping[str, str]] = ..., error_message: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class PublishMessageRequest(_message.Message):
    __slots__ = ("client_id", "message_name", "payload", "delivery_to", "metadata", "payload_metadata")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_TO_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_METADATA_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    message_name: str
    payload: str
    delivery_to: str
    metadata: str
    payload_metadata: str
    def __init__(self, client_id: _Optional[str] = ..., message_name: _Optional[str] = ..., payload: _Optional[str] = ..., delivery_to: _Optional[str] = ..., metadata: _Optional[str] = ..., payload_metadata: _Optional[str] = ...) -> None: ...

class PublishMessageResponse(_message.Message):
    __slots__ = ("success", "message_idem", "error_message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDEM_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message_idem: str
    error_message: str
    def __init__(self, success: _Optional[bool] = ..., message_idem: _Optional[str] = ..., error_message: _Optional[str] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("client_id", "message_name")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    message_name: str
    def __init__(self, client_id: _Optional[str] = ..., message_name: _Optional[str] = ...) -> None: ...

class UnsubscribeRequest(_message.Message):
    __slots__ = ("client_id", "message_name")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    message_name: str
    def __init__(self, client_id: _Optional[str] = ..., message_name: _Optional[str] = ...) -> None: ...

class UnsubscribeResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class MessageStreamResponse(_message.Message):
    __slots__ = ("message_idem", "message_name", "payload", "partition_block", "metadata", "sender", "attempt")
    MESSAGE_IDEM_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PARTITION_BLOCK_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    message_idem: str
    message_name: str
    payload: str
    partition_block: int
    metadata: str
    sender: str
    attempt: int
    def __init__(self, message_idem: _Optional[str] = ..., message_name: _Optional[str] = ..., payload: _Optional[str] = ..., partition_block: _Optional[int] = ..., metadata: _Optional[str] = ..., sender: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class AcknowledgeRequest(_message.Message):
    __slots__ = ("client_id", "message_idem", "message_name", "partition_block")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDEM_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    PARTITION_BLOCK_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    message_idem: str
    message_name: str
    partition_block: int
    def __init__(self, client_id: _Optional[str] = ..., message_idem: _Optional[str] = ..., message_name: _Optional[str] = ..., partition_block: _Optional[int] = ...) -> None: ...

class AcknowledgeResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class DeferRequest(_message.Message):
    __slots__ = ("client_id", "message_idem", "message_name", "delay_ms", "priority", "reason")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDEM_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    message_idem: str
    message_name: str
    delay_ms: int
    priority: int
    reason: str
    def __init__(self, client_id: _Optional[str] = ..., message_idem: _Optional[str] = ..., message_name: _Optional[str] = ..., delay_ms: _Optional[int] = ..., priority: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class DeferResponse(_message.Message):
    __slots__ = ("success", "message", "delivery_time")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_TIME_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    delivery_time: int
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., delivery_time: _Optional[int] = ...) -> None: ...

class DiscardRequest(_message.Message):
    __slots__ = ("client_id", "message_idem", "message_name", "reason")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDEM_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    message_idem: str
    message_name: str
    reason: str
    def __init__(self, client_id: _Optional[str] = ..., message_idem: _Optional[str] = ..., message_name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DiscardResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class ReplayRequest(_message.Message):
    __slots__ = ("client_id", "message_idem", "message_name")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDEM_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    message_idem: str
    message_name: str
    def __init__(self, client_id: _Optional[str] = ..., message_idem: _Optional[str] = ..., message_name: _Optional[str] = ...) -> None: ...

class ReplayResponse(_message.Message):
    __slots__ = ("success", "message", "message_data")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_DATA_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    message_data: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., message_data: _Optional[str] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("client_id", "message_name", "reason")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    message_name: str
    reason: str
    def __init__(self, client_id: _Optional[str] = ..., message_name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PauseResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class ContinueRequest(_message.Message):
    __slots__ = ("client_id", "message_name")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    message_name: str
    def __init__(self, client_id: _Optional[str] = ..., message_name: _Optional[str] = ...) -> None: ...

class ContinueResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class PublishEventRequest(_message.Message):
    __slots__ = ("client_id", "event_name", "payload", "delivery_to", "metadata", "payload_metadata")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_TO_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_METADATA_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    event_name: str
    payload: str
    delivery_to: str
    metadata: str
    payload_metadata: str
    def __init__(self, client_id: _Optional[str] = ..., event_name: _Optional[str] = ..., payload: _Optional[str] = ..., delivery_to: _Optional[str] = ..., metadata: _Optional[str] = ..., payload_metadata: _Optional[str] = ...) -> None: ...

class PublishEventResponse(_message.Message):
    __slots__ = ("success", "event_idem", "error_message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    EVENT_IDEM_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    event_idem: str
    error_message: str
    def __init__(self, success: _Optional[bool] = ..., event_idem: _Optional[str] = ..., error_message: _Optional[str] = ...) -> None: ...

class EventStreamResponse(_message.Message):
    __slots__ = ("event_idem", "event_name", "payload", "partition_block", "metadata", "sender", "attempt")
    EVENT_IDEM_FIELD_NUMBER: _ClassVar[int]
    EVENT_NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PARTITION_BLOCK_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    event_idem: str
    event_name: str
    payload: str
    partition_block: int
    metadata: str
    sender: str
    attempt: int
    def __init__(self, event_idem: _Optional[str] = ..., event_name: _Optional[str] = ..., payload: _Optional[str] = ..., partition_block: _Optional[int] = ..., metadata: _Optional[str] = ..., sender: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class AcknowledgeEventRequest(_message.Message):
    __slots__ = ("client_id", "event_idem", "event_name", "partition_block")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_IDEM_FIELD_NUMBER: _ClassVar[int]
    EVENT_NAME_FIELD_NUMBER: _ClassVar[int]
    PARTITION_BLOCK_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    event_idem: str
    event_name: str
    partition_block: int
    def __init__(self, client_id: _Optional[str] = ..., event_idem: _Optional[str] = ..., event_name: _Optional[str] = ..., partition_block: _Optional[int] = ...) -> None: ...

class DeferEventRequest(_message.Message):
    __slots__ = ("client_id", "event_idem", "event_name", "delay_ms", "priority", "reason")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_IDEM_FIELD_NUMBER: _ClassVar[int]
    EVENT_NAME_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    event_idem: str
    event_name: str
    delay_ms: int
    priority: int
    reason: str
    def __init__(self, client_id: _Optional[str] = ..., event_idem: _Optional[str] = ..., event_name: _Optional[str] = ..., delay_ms: _Optional[int] = ..., priority: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class DiscardEventRequest(_message.Message):
    __slots__ = ("client_id", "event_idem", "event_name", "reason")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_IDEM_FIELD_NUMBER: _ClassVar[int]
    EVENT_NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    event_idem: str
    event_name: str
    reason: str
    def __init__(self, client_id: _Optional[str] = ..., event_idem: _Optional[str] = ..., event_name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReplayEventRequest(_message.Message):
    __slots__ = ("client_id", "event_idem", "event_name")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_IDEM_FIELD_NUMBER: _ClassVar[int]
    EVENT_NAME_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    event_idem: str
    event_name: str
    def __init__(self, client_id: _Optional[str] = ..., event_idem: _Optional[str] = ..., event_name: _Optional[str] = ...) -> None: ...

class ReplayEventResponse(_message.Message):
    __slots__ = ("success", "message", "event_data")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EVENT_DATA_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    event_data: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., event_data: _Optional[str] = ...) -> None: ...

class PauseEventsRequest(_message.Message):
    __slots__ = ("client_id", "event_name", "reason")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    event_name: str
    reason: str
    def __init__(self, client_id: _Optional[str] = ..., event_name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ContinueEventsRequest(_message.Message):
    __slots__ = ("client_id", "event_name")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_NAME_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    event_name: str
    def __init__(self, client_id: _Optional[str] = ..., event_name: _Optional[str] = ...) -> None: ...

class ExtendRequest(_message.Message):
    __slots__ = ("client_id", "message_idem", "message_name")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDEM_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    message_idem: str
    message_name: str
    def __init__(self, client_id: _Optional[str] = ..., message_idem: _Optional[str] = ..., message_name: _Optional[str] = ...) -> None: ...

class ExtendResponse(_message.Message):
    __slots__ = ("success", "message", "deadline")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    deadline: int
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., deadline: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("client_id", "message_idem", "message_name", "reason")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDEM_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    message_idem: str
    message_name: str
    reason: str
    def __init__(self, client_id: _Optional[str] = ..., message_idem: _Optional[str] = ..., message_name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("success", "message", "delivery_time")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_TIME_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    delivery_time: int
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ..., delivery_time: _Optional[int] = ...) -> None: ...

class SessionHello(_message.Message):
    __slots__ = ("client_id", "version", "capabilities")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    version: int
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, client_id: _Optional[str] = ..., version: _Optional[int] = ..., capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class SessionWelcome(_message.Message):
    __slots__ = ("version", "capabilities", "limits")
    class LimitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    version: int
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    limits: _containers.ScalarMap[str, str]
    def __init__(self, version: _Optional[int] = ..., capabilities: _Optional[_Iterable[str]] = ..., limits: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SessionPublish(_message.Message):
    __slots__ = ("seq", "message_name", "payload", "delivery_to", "metadata", "payload_metadata")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_TO_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_METADATA_FIELD_NUMBER: _ClassVar[int]
    seq: int
    message_name: str
    payload: str
    delivery_to: str
    metadata: str
    payload_metadata: str
    def __init__(self, seq: _Optional[int] = ..., message_name: _Optional[str] = ..., payload: _Optional[str] = ..., delivery_to: _Optional[str] = ..., metadata: _Optional[str] = ..., payload_metadata: _Optional[str] = ...) -> None: ...

class SessionPublished(_message.Message):
    __slots__ = ("seq", "success", "message_idem", "error_message")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDEM_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    success: bool
    message_idem: str
    error_message: str
    def __init__(self, seq: _Optional[int] = ..., success: _Optional[bool] = ..., message_idem: _Optional[str] = ..., error_message: _Optional[str] = ...) -> None: ...

class SessionSettle(_message.Message):
    __slots__ = ("seq", "kind", "message_idem", "message_name", "delay_ms", "reason")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_IDEM_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    kind: SettleKind
    message_idem: str
    message_name: str
    delay_ms: int
    reason: str
    def __init__(self, seq: _Optional[int] = ..., kind: _Optional[_Union[SettleKind, str]] = ..., message_idem: _Optional[str] = ..., message_name: _Optional[str] = ..., delay_ms: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class SessionSettled(_message.Message):
    __slots__ = ("seq", "success", "message", "time_ms")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    success: bool
    message: str
    time_ms: int
    def __init__(self, seq: _Optional[int] = ..., success: _Optional[bool] = ..., message: _Optional[str] = ..., time_ms: _Optional[int] = ...) -> None: ...

class SessionCredit(_message.Message):
    __slots__ = ("message_name", "credit")
    MESSAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    message_name: str
    credit: int
    def __init__(self, message_name: _Optional[str] = ..., credit: _Optional[int] = ...) -> None: ...

class SessionObserve(_message.Message):
    __slots__ = ("seq", "pattern", "stop")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    seq: int
    pattern: str
    stop: bool
    def __init__(self, seq: _Optional[int] = ..., pattern: _Optional[str] = ..., stop: _Optional[bool] = ...) -> None: ...

class ClientFrame(_message.Message):
    __slots__ = ("hello", "publishes", "settles", "credits", "observes", "goodbye")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    PUBLISHES_FIELD_NUMBER: _ClassVar[int]
    SETTLES_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    OBSERVES_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    hello: SessionHello
    publishes: _containers.RepeatedCompositeFieldContainer[SessionPublish]
    settles: _containers.RepeatedCompositeFieldContainer[SessionSettle]
    credits: _containers.RepeatedCompositeFieldContainer[SessionCredit]
    observes: _containers.RepeatedCompositeFieldContainer[SessionObserve]
    goodbye: bool
    def __init__(self, hello: _Optional[_Union[SessionHello, _Mapping]] = ..., publishes: _Optional[_Iterable[_Union[SessionPublish, _Mapping]]] = ..., settles: _Optional[_Iterable[_Union[SessionSettle, _Mapping]]] = ..., credits: _Optional[_Iterable[_Union[SessionCredit, _Mapping]]] = ..., observes: _Optional[_Iterable[_Union[SessionObserve, _Mapping]]] = ..., goodbye: _Optional[bool] = ...) -> None: ...

class ServerFrame(_message.Message):
    __slots__ = ("welcome", "published", "settled", "deliveries", "observing", "observed", "observed_missed", "goodbye")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    SETTLED_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    OBSERVING_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_MISSED_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    welcome: SessionWelcome
    published: _containers.RepeatedCompositeFieldContainer[SessionPublished]
    settled: _containers.RepeatedCompositeFieldContainer[SessionSettled]
    deliveries: _containers.RepeatedCompositeFieldContainer[MessageStreamResponse]
    observing: _containers.RepeatedCompositeFieldContainer[SessionSettled]
    observed: _containers.RepeatedCompositeFieldContainer[MessageStreamResponse]
    observed_missed: int
    goodbye: bool
    def __init__(self, welcome: _Optional[_Union[SessionWelcome, _Mapping]] = ..., published: _Optional[_Iterable[_Union[SessionPublished, _Mapping]]] = ..., settled: _Optional[_Iterable[_Union[SessionSettled, _Mapping]]] = ..., deliveries: _Optional[_Iterable[_Union[MessageStreamResponse, _Mapping]]] = ..., observing: _Optional[_Iterable[_Union[SessionSettled, _Mapping]]] = ..., observed: _Optional[_Iterable[_Union[MessageStreamResponse, _Mapping]]] = ..., observed_missed: _Optional[int] = ..., goodbye: _Optional[bool] = ...) -> None: ...
