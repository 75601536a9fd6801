-- REPLACE (INSERT OR REPLACE, REPLACE INTO) deletes the event it collides with and inserts
-- its own, and SQLite fires no DELETE trigger for that unless recursive_triggers is on, as
-- no connection of an operator's has it: events_no_delete let such a statement rewrite
-- history. An insert that collides with a stored event is refused before it can.
CREATE TRIGGER events_no_replace BEFORE INSERT ON events
WHEN EXISTS (
    SELECT 1 FROM events
    WHERE global_position = NEW.global_position
       OR event_id = NEW.event_id
       OR (stream_id = NEW.stream_id AND stream_version = NEW.stream_version)
)
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: an event with this position, id or stream version is stored');
END;
