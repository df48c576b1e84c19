/**
 * Tests run as CommonJS; ts-jest only transpiles (isolatedModules), the type check is the
 * `tsc --noEmit` that `npm test` runs first.
 */
module.exports = {
  testEnvironment: 'node',
  testMatch: ['<rootDir>/test/**/*.test.ts'],
  transform: { '^.+\\.ts$': 'ts-jest' },
  testTimeout: 20000,
  reporters: ['default', '<rootDir>/test/support/summary-reporter.js'],
};
