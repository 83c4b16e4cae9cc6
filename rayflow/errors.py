"""The one exception tree of rayflow.

Every error rayflow raises on purpose derives from :class:`RayflowError`, and
also from the builtin exception a Python caller would expect, so both
``except rf.errors.RayflowError`` and ``except ValueError`` work::

    RayflowError
    ├── ConfigError(ValueError)            a Pipeline or config argument is invalid
    │   └── TierError                      priority tiers that cannot hold together (rf.Tier)
    ├── InputError(ValueError)             the input data cannot be used
    │   ├── MissingKeyColumnError(KeyError)  the key column is not in the input
    │   ├── UnsupportedKeyTypeError(TypeError)  the key column's type cannot be hashed
    │   ├── EmptyInputError                the source has no rows (or no files)
    │   ├── SourceNotFoundError(FileNotFoundError)  a file, directory or glob matched nothing
    │   │   └── TopicNotFoundError         a Kafka topic (or partition) does not exist
    │   ├── MalformedInputError            a row or file could not be parsed
    │   │   └── BadRecordError             a Kafka message could not be decoded (partition, offset)
    │   └── PositionOutOfRangeError        a committed position is no longer in the input (retention)
    ├── BrokerUnreachableError(ConnectionError)  a Kafka broker did not answer within the timeout
    ├── CheckpointError                    committed state cannot be used as it is
    │   └── IncompatibleCheckpointError    the checkpoint was written by a different job shape
    │       ├── MissingSplitsError         splits with committed positions are not in this run's source
    │       └── RepartitionError           the committed state cannot be re-split into the new partition count
    ├── FencedError                        a stale lease epoch: the caller no longer owns the partition
    ├── ProtocolError(RuntimeError)        a message broke the commit or lease protocol (a bug)
    │   └── PositionGapError               rows are missing between two batches of a split
    └── PipelineFailedError(RuntimeError)  an actor of the running job failed; the cause is attached

Messages say what was wrong, with the offending value, and what to do next.
Raising one of these never records anything as committed: commits are
validated before the catalog transaction, never after.
"""

from __future__ import annotations


class RayflowError(Exception):
    """Base class of every error rayflow raises on purpose."""


class ConfigError(RayflowError, ValueError):
    """A Pipeline or config argument is invalid. Fix the argument and run again."""


class TierError(ConfigError):
    """Priority tiers (``rf.Tier``) that cannot hold together: two tiers on one partition, a
    partition out of range, more dedicated consumers than the job has. The message names the
    tiers and partitions, and what to change."""


class InputError(RayflowError, ValueError):
    """The input data cannot be used as given."""


class MissingKeyColumnError(InputError, KeyError):
    """The key column named in the pipeline is not in the input's schema."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnsupportedKeyTypeError(InputError, TypeError):
    """The key column's Arrow type cannot be hashed into partitions."""


class EmptyInputError(InputError):
    """The source holds no rows at all."""


class SourceNotFoundError(InputError, FileNotFoundError):
    """A file, directory or glob given as input matched nothing."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class MalformedInputError(InputError):
    """A row or file of the input could not be parsed."""


class TopicNotFoundError(SourceNotFoundError):
    """A Kafka topic, or a partition of it, does not exist on the broker. ``topic`` names it."""

    def __init__(self, message: str, *, topic: str):
        super().__init__(message)
        self.topic = topic

    def __reduce__(self):  # keep the keyword field across Ray's pickling
        return (_rebuild_topic_not_found, (self.args[0], self.topic))


def _rebuild_topic_not_found(message: str, topic: str) -> TopicNotFoundError:
    return TopicNotFoundError(message, topic=topic)


class BadRecordError(MalformedInputError):
    """A Kafka message could not be decoded (``on_bad_record="fail"``). ``topic``,
    ``partition`` and ``offset`` name the message; the message text says why."""

    def __init__(self, message: str, *, topic: str, partition: int, offset: int):
        super().__init__(message)
        self.topic = topic
        self.partition = partition
        self.offset = offset

    def __reduce__(self):
        return (_rebuild_bad_record, (self.args[0], self.topic, self.partition, self.offset))


def _rebuild_bad_record(message: str, topic: str, partition: int, offset: int) -> BadRecordError:
    return BadRecordError(message, topic=topic, partition=partition, offset=offset)


class PositionOutOfRangeError(InputError):
    """A position to resume from is no longer in the input: the Kafka broker deleted that
    offset (retention, compaction of the whole range). Rows would be lost silently if reading
    went on, so it stops; start a new job (another ``name``) to read what is left."""


class BrokerUnreachableError(RayflowError, ConnectionError):
    """A Kafka broker did not answer within the timeout (``connect_timeout_s``), or did not
    acknowledge produced messages in time. Check ``bootstrap_servers`` and that the broker runs."""


class CheckpointError(RayflowError):
    """Committed state cannot be used as it is."""


class IncompatibleCheckpointError(CheckpointError, ValueError):
    """The checkpoint was written by a job of a different shape (schema, key, partition map)."""


class RepartitionError(IncompatibleCheckpointError):
    """A run asks for another partition count, and the committed state cannot be re-split into
    it exactly (merged partitions that do not stand at the same positions, state without key
    columns, a remote checkpoint directory). The message says which and what to do."""


class MissingSplitsError(IncompatibleCheckpointError):
    """Input splits with committed positions are not in this run's source (files gone, or a
    source that now names its splits otherwise): resuming would count their rows again or lose
    them. The message names the splits, and the source argument that resumes when there is one."""


class FencedError(RayflowError):
    """A fetch, commit or trim carried a stale lease epoch.

    The caller no longer owns the partition: abandon it, drop its uncommitted
    state, and take the assignment from the next heartbeat.
    """

    def __init__(self, message: str, *, partition: int, epoch: int, current_epoch: int):
        super().__init__(message)
        self.partition = partition
        self.epoch = epoch
        self.current_epoch = current_epoch

    @classmethod
    def stale(
        cls, *, partition: int, epoch: int, current_epoch: int, member: str | None = None, owner=None
    ) -> FencedError:
        """The one way rayflow builds this error: the stale epoch, the current one, what to do."""
        who = f" of {member!r}" if member is not None else ""
        holder = f", owner {owner!r}" if member is not None else ""
        return cls(
            f"partition {partition}: lease epoch {epoch}{who} is stale (the current epoch is "
            f"{current_epoch}{holder}); abandon the partition, drop its uncommitted state and take "
            "the assignment of the next heartbeat",
            partition=partition,
            epoch=epoch,
            current_epoch=current_epoch,
        )

    def __reduce__(self):  # keep the keyword fields across Ray's pickling
        return (_rebuild_fenced, (self.args[0], self.partition, self.epoch, self.current_epoch))


def _rebuild_fenced(message: str, partition: int, epoch: int, current_epoch: int) -> FencedError:
    return FencedError(message, partition=partition, epoch=epoch, current_epoch=current_epoch)


class ProtocolError(RayflowError, RuntimeError):
    """A message broke the commit or lease protocol: positions that go back, a commit after
    the final one, a commit naming a missing file. It is a bug in rayflow (or in a custom
    source): nothing is recorded, and the message says what was asked and what holds."""


class PositionGapError(ProtocolError):
    """A batch of a split starts past the position its partition has processed: rows between
    the two would be lost. ``split``, ``partition``, ``position`` (processed so far) and
    ``start`` (the batch's first row) name the gap."""

    def __init__(self, message: str, *, split: str, partition: int, position: int, start: int):
        super().__init__(message)
        self.split = split
        self.partition = partition
        self.position = position
        self.start = start

    def __reduce__(self):
        return (
            _rebuild_gap,
            (self.args[0], self.split, self.partition, self.position, self.start),
        )


def _rebuild_gap(message: str, split: str, partition: int, position: int, start: int) -> PositionGapError:
    return PositionGapError(message, split=split, partition=partition, position=position, start=start)


class PipelineFailedError(RayflowError, RuntimeError):
    """An actor of the running job failed; ``__cause__`` holds the original error."""
