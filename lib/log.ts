/**
 * `debug` namespaces: DEBUG=nodemailer-binding-pool:* traces connection opens, transactions,
 * retirements and fallbacks. Callers log ids, hosts and counts only: never an options object,
 * so credentials cannot reach this output.
 */
import createDebug from 'debug';

export const connectionLog = createDebug('nodemailer-binding-pool:connection');
export const poolLog = createDebug('nodemailer-binding-pool:pool');
export const deliveryLog = createDebug('nodemailer-binding-pool:delivery');
export const transportLog = createDebug('nodemailer-binding-pool:transport');
export const coordinationLog = createDebug('nodemailer-binding-pool:coordination');
export const queueLog = createDebug('nodemailer-binding-pool:queue');
