// Structured JSON logs (pino) on stderr, so stdout stays for what commands print (keys, URLs).
import pino, { type Logger } from 'pino';

export function createLogger(level = process.env.KLEIN_LOG_LEVEL ?? 'info'): Logger {
  return pino({ level, base: { service: 'klein' } }, pino.destination(2));
}
