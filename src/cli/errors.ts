// Exit codes distinguish what the user can fix from what went wrong inside klein.
export const EXIT_FAILED = 1; // the command ran and reported failure (e.g. a conformance case failed)
export const EXIT_USAGE = 2; // bad arguments or bad input: the user can fix it
export const EXIT_INTERNAL = 3; // an unexpected internal error

import { UserError } from '../errors.ts';

/** An error in the command line the user can fix: printed without a stack trace, exit code 2 (see UserError). */
export class UsageError extends UserError {
  override name = 'UsageError';
}
