// Closing a BullMQ Queue, QueueEvents or Worker while its Redis connections are still starting must not kill the
// process. BullMQ 5.81 starts each RedisConnection with an init() (connect, then an INFO for the server version)
// whose failure it emits as an 'error' on that connection; close() removes every listener of the connection, yet an
// init() it cut short (INFO in flight) fails a moment later with ioredis' "Connection is closed" — an 'error' with no
// listener left, which Node throws, uncaught (taskforcesh/bullmq#3546, open). `klein serve --queue --workers 1`
// stopped right after its start died of it (exit 1): its local worker's connections were still starting.
import type { QueueBase, RedisConnection } from 'bullmq';
import type { Logger } from 'pino';

/**
 * Makes `o` (a Queue, QueueEvents or Worker, just built) safe to close at any moment: an error its connections emit
 * once they are closing and nobody listens any more is logged at debug level instead of thrown. Errors before the
 * close still reach `o`'s own 'error' listeners as before. Returns `o`.
 */
export function closableWhileStarting<T extends QueueBase>(o: T, log: Logger): T {
  // the connections are protected in BullMQ's types; a Worker has a second one for its blocking reads
  const owned = o as unknown as { connection?: RedisConnection; blockingConnection?: RedisConnection };
  for (const conn of [owned.connection, owned.blockingConnection]) {
    if (!conn) continue;
    const emit = conn.emit.bind(conn);
    conn.emit = (event: string | symbol, ...args: unknown[]): boolean => {
      if (event === 'error' && conn.closing && conn.listenerCount('error') === 0) {
        log.debug({ err: args[0], queue: o.name }, 'redis connection error after close (its start-up was cut short)');
        return false;
      }
      return emit(event, ...args);
    };
  }
  return o;
}
