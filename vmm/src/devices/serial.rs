//! The 8250 UART at I/O port 0x3f8 (vm-superio), its output appended to the VM's console log.

use std::fs::File;
use std::io::{self, BufWriter, Write};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// First I/O port of COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// Number of I/O ports of the UART.
pub const SERIAL_PORT_LEN: u16 = 8;

/// Raises the serial IRQ through a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A console log writer that flushes at every newline, so the log is readable while the guest runs.
pub struct ConsoleLog {
    out: BufWriter<File>,
}

impl ConsoleLog {
    /// Wraps an open log file.
    pub fn new(file: File) -> ConsoleLog {
        ConsoleLog {
            out: BufWriter::with_capacity(4096, file),
        }
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        if buf[..n].contains(&b'\n') {
            self.out.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The guest's serial port.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, NoEvents, ConsoleLog>,
}

impl SerialConsole {
    /// A UART raising `irq` and writing to `log`.
    pub fn new(irq: EventFd, log: File) -> SerialConsole {
        SerialConsole {
            uart: Serial::new(IrqTrigger(irq), ConsoleLog::new(log)),
        }
    }

    /// Guest `in` from port `SERIAL_PORT_BASE + offset`.
    pub fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.uart.read(offset as u8);
        }
    }

    /// Guest `out` to port `SERIAL_PORT_BASE + offset`; a failing log write is dropped, not fatal.
    pub fn pio_write(&mut self, offset: u16, data: &[u8]) {
        if let Some(b) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, *b) {
                tracing::debug!("serial write failed: {e:?}");
            }
        }
    }

    /// Flushes buffered console output.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_written_to_thr_reach_the_log_at_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut serial = SerialConsole::new(EventFd::new(0).unwrap(), File::create(&path).unwrap());
        for b in b"hello\n" {
            serial.pio_write(0, &[*b]);
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello\n");
        // LSR reports an empty transmitter so the guest keeps writing.
        let mut lsr = [0u8];
        serial.pio_read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
