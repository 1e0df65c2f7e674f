// Errors that every layer may raise and every edge maps: a problem with what the user asked for.

/**
 * Something the user asked for cannot be done as asked (a flag, a request field, the environment, the machine's
 * memory), and they can change it: the CLI prints the message without a stack trace and exits 2, the API answers
 * with a 4xx status and `code`.
 */
export class UserError extends Error {
  override name = 'UserError';
  constructor(
    message: string,
    /** A stable machine-readable code for API clients. */
    readonly code = 'invalid_request',
  ) {
    super(message);
  }
}
